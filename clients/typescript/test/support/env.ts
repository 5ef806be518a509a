/**
 * Where the test tools are, and temp dirs / ports / child processes that are
 * always cleaned up (also when a test fails or the runner is interrupted).
 */

import { type ChildProcess, spawn, type SpawnOptions } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** clients/typescript (tests run from build/test/..., sources from test/...). */
export const PACKAGE_ROOT = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, "package.json")) || !existsSync(join(dir, "buf.gen.yaml"))) {
    const parent = dirname(dir);
    if (parent === dir) {
      throw new Error("cannot find clients/typescript");
    }
    dir = parent;
  }
  return dir;
})();

/** The walcast repository root. */
export const REPO_ROOT = resolve(PACKAGE_ROOT, "../..");

/** Output of tests (screenshots, logs): clients/typescript/test-output/. */
export const OUTPUT_DIR = join(PACKAGE_ROOT, "test-output");

export function natsServerBin(): string {
  const bin = process.env["WALCAST_NATS_SERVER"] ?? join(REPO_ROOT, ".tools/bin/nats-server");
  if (!existsSync(bin)) {
    throw new Error(`nats-server not found at ${bin}: run scripts/install-deps.sh (or set WALCAST_NATS_SERVER)`);
  }
  return bin;
}

export function pgBin(): string {
  const fromEnv = process.env["WALCAST_PG_BIN"];
  if (fromEnv !== undefined && existsSync(join(fromEnv, "initdb"))) {
    return fromEnv;
  }
  const root = "/usr/lib/postgresql";
  const versions = existsSync(root)
    ? readdirSync(root)
        .filter((v) => existsSync(join(root, v, "bin/initdb")))
        .sort((a, b) => Number(b) - Number(a))
    : [];
  if (versions[0] === undefined) {
    throw new Error("PostgreSQL binaries not found: run scripts/install-deps.sh (or set WALCAST_PG_BIN)");
  }
  return join(root, versions[0], "bin");
}

export function walcastBin(): string {
  const bin = process.env["WALCAST_BIN"] ?? join(REPO_ROOT, "target/debug/walcast");
  if (!existsSync(bin)) {
    throw new Error(`walcast binary not found at ${bin}: run cargo build (or set WALCAST_BIN)`);
  }
  return bin;
}

export const IS_ROOT = typeof process.getuid === "function" && process.getuid() === 0;

/** A TCP port that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => resolvePort(port));
    });
  });
}

const tempDirs = new Set<string>();
const children = new Set<ChildProcess>();

/** A fresh temp dir, deleted at exit (or earlier with `removeTempDir`). */
export function makeTempDir(name: string): string {
  const dir = mkdtempSync(join(tmpdir(), `walcast-ts-${name}-`));
  tempDirs.add(dir);
  return dir;
}

export function removeTempDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  tempDirs.delete(dir);
}

/** Spawns a child that is killed (SIGKILL) at exit if still running. */
export function spawnTracked(command: string, args: string[], options: SpawnOptions): ChildProcess {
  const child = spawn(command, args, { ...options, detached: false });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

/** Sends `signal` and waits (bounded) for the child to exit; SIGKILL after the timeout. */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = "SIGTERM", timeoutMs = 10_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return;
  }
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
  await exited;
  clearTimeout(timer);
}

process.on("exit", () => {
  for (const child of children) {
    child.kill("SIGKILL");
  }
  for (const dir of tempDirs) {
    rmSync(dir, { recursive: true, force: true });
  }
});
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => process.exit(130));
}

/** Polls `condition` until it is truthy or `timeoutMs` passes. */
export async function waitFor<T>(
  what: string,
  condition: () => T | Promise<T>,
  timeoutMs: number,
  intervalMs = 20,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await condition();
      if (value) {
        return value as NonNullable<T>;
      }
    } catch (err) {
      lastError = err;
    }
    if (Date.now() > deadline) {
      const suffix = lastError instanceof Error ? ` (last error: ${lastError.message})` : "";
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${suffix}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
