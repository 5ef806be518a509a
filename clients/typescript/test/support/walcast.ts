/**
 * The real daemon: `walcast migrate`, then `walcast run` as a child process
 * against a test Postgres and nats-server, ready when `/readyz` says so.
 */

import type { ChildProcess } from "node:child_process";
import { execFile } from "node:child_process";
import { createWriteStream, readFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";

import { freePort, makeTempDir, removeTempDir, spawnTracked, stopChild, waitFor, walcastBin } from "./env.js";

const execFileAsync = promisify(execFile);

export class WalcastDaemon {
  readonly env: Record<string, string>;
  readonly dir: string;
  #child: ChildProcess | undefined;

  private constructor(env: Record<string, string>, dir: string) {
    this.env = env;
    this.dir = dir;
  }

  /** Migrates the database and starts `walcast run`. */
  static async start(databaseUrl: string, natsUrl: string): Promise<WalcastDaemon> {
    const daemon = await WalcastDaemon.migrated(databaseUrl, natsUrl);
    await daemon.start();
    return daemon;
  }

  /** Migrates the database (which creates the slot); `start()` runs it. */
  static async migrated(databaseUrl: string, natsUrl: string): Promise<WalcastDaemon> {
    const httpPort = await freePort();
    const env = {
      WALCAST_DATABASE_URL: databaseUrl,
      WALCAST_NATS_URL: natsUrl,
      WALCAST_CONFIRM_DELAY: "0",
      WALCAST_HTTP_ADDR: `127.0.0.1:${httpPort}`,
    };
    const daemon = new WalcastDaemon(env, makeTempDir("walcast"));
    await daemon.migrate();
    return daemon;
  }

  /** `walcast migrate` (idempotent; creates the slot if it is missing). */
  async migrate(): Promise<void> {
    try {
      await execFileAsync(walcastBin(), ["migrate"], { env: { ...process.env, ...this.env } });
    } catch (err) {
      const e = err as { stderr?: string; message: string };
      throw new Error(`walcast migrate failed: ${e.stderr ?? e.message}`);
    }
  }

  get httpAddr(): string {
    return this.env["WALCAST_HTTP_ADDR"] as string;
  }

  log(): string {
    try {
      return readFileSync(join(this.dir, "walcast.log"), "utf8");
    } catch {
      return "";
    }
  }

  async start(): Promise<void> {
    const log = createWriteStream(join(this.dir, "walcast.log"), { flags: "a" });
    const child = spawnTracked(walcastBin(), ["run"], {
      env: { ...process.env, RUST_LOG: process.env["RUST_LOG"] ?? "walcast=info", ...this.env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    child.stdout?.pipe(log);
    child.stderr?.pipe(log);
    this.#child = child;
    await waitFor(
      "walcast /readyz",
      async () => {
        if (child.exitCode !== null) {
          throw new Error(`walcast run exited with ${child.exitCode}:\n${this.log()}`);
        }
        const response = await fetch(`http://${this.httpAddr}/readyz`);
        return response.ok;
      },
      30_000,
      50,
    );
  }

  async stop(): Promise<void> {
    const child = this.#child;
    this.#child = undefined;
    if (child !== undefined) {
      await stopChild(child, "SIGTERM", 15_000);
    }
  }

  async destroy(): Promise<void> {
    await this.stop();
    removeTempDir(this.dir);
  }
}
