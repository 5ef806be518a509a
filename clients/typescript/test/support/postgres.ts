/**
 * A throwaway PostgreSQL cluster (wal_level=logical) on a random port, in a
 * temp dir. Postgres refuses to run as root: then the dir is handed to the
 * `postgres` user and the server runs through `runuser`.
 */

import { type ChildProcess, execFileSync } from "node:child_process";
import { appendFileSync, chmodSync, createWriteStream, readFileSync } from "node:fs";
import { join } from "node:path";

import pg from "pg";

import { IS_ROOT, freePort, makeTempDir, pgBin, removeTempDir, spawnTracked, stopChild, waitFor } from "./env.js";

function asPostgres(command: string, args: string[]): [string, string[]] {
  return IS_ROOT ? ["runuser", ["-u", "postgres", "--", command, ...args]] : [command, args];
}

export class PostgresServer {
  readonly port: number;
  readonly dir: string;
  #child: ChildProcess | undefined;

  private constructor(port: number, dir: string) {
    this.port = port;
    this.dir = dir;
  }

  static async start(): Promise<PostgresServer> {
    const dir = makeTempDir("pg");
    if (IS_ROOT) {
      chmodSync(dir, 0o755);
      execFileSync("chown", ["-R", "postgres:postgres", dir]);
    }
    const bin = pgBin();
    const data = join(dir, "data");
    const [cmd, args] = asPostgres(join(bin, "initdb"), [
      "-D",
      data,
      "-U",
      "postgres",
      "--auth=trust",
      "--no-sync",
      "-E",
      "UTF8",
    ]);
    execFileSync(cmd, args, { stdio: "pipe" });
    const server = new PostgresServer(await freePort(), dir);
    const settings = [
      "listen_addresses = '127.0.0.1'",
      `port = ${server.port}`,
      `unix_socket_directories = '${dir}'`,
      "wal_level = logical",
      "max_replication_slots = 10",
      "max_wal_senders = 10",
      "fsync = off",
      "full_page_writes = off",
      "synchronous_commit = on",
    ];
    appendFileSync(join(data, "postgresql.conf"), `\n${settings.join("\n")}\n`);
    await server.start();
    return server;
  }

  get url(): string {
    return `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  log(): string {
    try {
      return readFileSync(join(this.dir, "postgres.log"), "utf8");
    } catch {
      return "";
    }
  }

  async start(): Promise<void> {
    const log = createWriteStream(join(this.dir, "postgres.log"), { flags: "a" });
    const [cmd, args] = asPostgres(join(pgBin(), "postgres"), ["-D", join(this.dir, "data")]);
    const child = spawnTracked(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    child.stdout?.pipe(log);
    child.stderr?.pipe(log);
    this.#child = child;
    await waitFor(
      `postgres on port ${this.port}`,
      async () => {
        if (child.exitCode !== null) {
          throw new Error(`postgres exited: ${this.log()}`);
        }
        const client = new pg.Client({ connectionString: this.url });
        try {
          await client.connect();
          await client.query("SELECT 1");
          return true;
        } finally {
          await client.end().catch(() => {});
        }
      },
      30_000,
      50,
    );
  }

  /** A connected client; the caller ends it. */
  async client(): Promise<pg.Client> {
    const client = new pg.Client({ connectionString: this.url });
    await client.connect();
    return client;
  }

  async destroy(): Promise<void> {
    const child = this.#child;
    this.#child = undefined;
    if (child !== undefined && child.exitCode === null) {
      // runuser does not pass signals on: ask pg_ctl for a fast shutdown.
      const exited = new Promise<void>((done) => child.once("exit", () => done()));
      const [cmd, args] = asPostgres(join(pgBin(), "pg_ctl"), ["-D", join(this.dir, "data"), "-m", "fast", "-w", "stop"]);
      try {
        execFileSync(cmd, args, { stdio: "pipe", timeout: 20_000 });
      } catch {
        // Already gone, or stuck: the kill below ends it.
      }
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([exited, new Promise((r) => (timer = setTimeout(r, 5_000)))]);
      clearTimeout(timer);
      await stopChild(child, "SIGKILL");
    }
    removeTempDir(this.dir);
  }
}
