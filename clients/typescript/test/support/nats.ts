/**
 * A throwaway nats-server with JetStream on a random port and its own store
 * dir. `stop()` + `start()` restart exactly the same server (port, store).
 */

import type { ChildProcess } from "node:child_process";
import { createWriteStream, readFileSync, writeFileSync } from "node:fs";
import { connect as tcpConnect } from "node:net";
import { join } from "node:path";

import { freePort, makeTempDir, natsServerBin, removeTempDir, spawnTracked, stopChild, waitFor } from "./env.js";

export class NatsServer {
  readonly port: number;
  readonly dir: string;
  /** A config file (`-c`) and the environment it reads, if any. */
  #config: { path: string; env: Record<string, string> } | undefined;
  #child: ChildProcess | undefined;

  private constructor(port: number, dir: string) {
    this.port = port;
    this.dir = dir;
  }

  static async start(): Promise<NatsServer> {
    const server = new NatsServer(await freePort(), makeTempDir("nats"));
    await server.start();
    return server;
  }

  /** Starts a server with `config` as its config file (`-c`) and `env` for its `$VAR`s. */
  static async startWithConfig(config: string, env: Record<string, string>): Promise<NatsServer> {
    const server = new NatsServer(await freePort(), makeTempDir("nats"));
    const path = join(server.dir, "nats.conf");
    writeFileSync(path, config);
    server.#config = { path, env };
    await server.start();
    return server;
  }

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  get logPath(): string {
    return join(this.dir, "nats.log");
  }

  log(): string {
    try {
      return readFileSync(this.logPath, "utf8");
    } catch {
      return "";
    }
  }

  /** (Re)starts the server and waits until it accepts connections. */
  async start(): Promise<void> {
    if (this.#child !== undefined) {
      throw new Error("nats-server already running");
    }
    const log = createWriteStream(this.logPath, { flags: "a" });
    const config = this.#config === undefined ? [] : ["-c", this.#config.path];
    const child = spawnTracked(
      natsServerBin(),
      [...config, "-js", "-a", "127.0.0.1", "-p", String(this.port), "-sd", join(this.dir, "store"), "--no_advertise"],
      { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...this.#config?.env } },
    );
    child.stdout?.pipe(log);
    child.stderr?.pipe(log);
    this.#child = child;
    await waitFor(
      `nats-server on port ${this.port}`,
      () => {
        if (child.exitCode !== null) {
          throw new Error(`nats-server exited: ${this.log()}`);
        }
        return canConnect(this.port);
      },
      15_000,
    );
  }

  /** Stops it (SIGTERM: JetStream flushes its store). */
  async stop(): Promise<void> {
    const child = this.#child;
    this.#child = undefined;
    if (child !== undefined) {
      await stopChild(child, "SIGTERM");
    }
  }

  /** Kills it (SIGKILL): a node that dies without a word. */
  async kill(): Promise<void> {
    const child = this.#child;
    this.#child = undefined;
    if (child !== undefined) {
      await stopChild(child, "SIGKILL");
    }
  }

  async destroy(): Promise<void> {
    await this.stop();
    removeTempDir(this.dir);
  }
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = tcpConnect({ port, host: "127.0.0.1" });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/**
 * Three JetStream servers routed to each other on loopback, named `n0`..`n2`
 * (the names stream and consumer info give).
 */
export async function startCluster(): Promise<NatsServer[]> {
  const routes = [await freePort(), await freePort(), await freePort()];
  const nodes: NatsServer[] = [];
  for (const [i, port] of routes.entries()) {
    const others = routes.filter((p) => p !== port).map((p) => `nats-route://127.0.0.1:${p}`);
    const config = [
      `server_name: n${i}`,
      `cluster { name: wc, listen: "127.0.0.1:${port}", routes: [${others.map((r) => `"${r}"`).join(", ")}] }`,
      "",
    ].join("\n");
    nodes.push(await NatsServer.startWithConfig(config, {}));
  }
  return nodes;
}
