/** The example gateway (examples/socketio-gateway) as a child process. */

import type { ChildProcess } from "node:child_process";
import { join } from "node:path";

import { PACKAGE_ROOT, spawnTracked, stopChild, waitFor } from "./env.js";

export class Gateway {
  readonly output: string[] = [];
  #child: ChildProcess;
  url = "";

  private constructor(child: ChildProcess) {
    this.#child = child;
    const collect = (chunk: Buffer): void => {
      this.output.push(...chunk.toString().split("\n").filter((l) => l !== ""));
    };
    child.stdout?.on("data", collect);
    child.stderr?.on("data", collect);
  }

  /** Starts `node dist/server.js` (build it first) and waits until it listens. */
  static async start(env: Record<string, string>): Promise<Gateway> {
    const dir = join(PACKAGE_ROOT, "examples/socketio-gateway");
    const child = spawnTracked(process.execPath, [join(dir, "dist/server.js")], {
      cwd: dir,
      env: { ...process.env, HOST: "127.0.0.1", PORT: "0", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    const gateway = new Gateway(child);
    const line = await waitFor(
      "the gateway to listen",
      () => {
        if (child.exitCode !== null) {
          throw new Error(`gateway exited ${child.exitCode}:\n${gateway.output.join("\n")}`);
        }
        return gateway.output.find((l) => l.startsWith("gateway listening on "));
      },
      15_000,
    );
    gateway.url = line.slice("gateway listening on ".length).trim();
    return gateway;
  }

  get port(): number {
    return Number(new URL(this.url).port);
  }

  async stop(): Promise<void> {
    await stopChild(this.#child, "SIGTERM", 5_000);
  }
}
