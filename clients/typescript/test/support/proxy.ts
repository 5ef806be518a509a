/**
 * A TCP proxy whose link can be cut: `cut()` drops every connection and
 * refuses new ones (like a network outage between browser and gateway);
 * `restore()` lets connections through again, on the same port.
 */

import { createServer, connect, type Server, type Socket } from "node:net";

import { freePort } from "./env.js";

export class TcpProxy {
  readonly port: number;
  readonly #target: { host: string; port: number };
  readonly #sockets = new Set<Socket>();
  #server: Server | undefined;

  private constructor(port: number, target: { host: string; port: number }) {
    this.port = port;
    this.#target = target;
  }

  static async start(targetPort: number, targetHost = "127.0.0.1"): Promise<TcpProxy> {
    const proxy = new TcpProxy(await freePort(), { host: targetHost, port: targetPort });
    await proxy.restore();
    return proxy;
  }

  /** Accepts connections (again). */
  async restore(): Promise<void> {
    if (this.#server !== undefined) {
      return;
    }
    const server = createServer((client) => {
      const upstream = connect(this.#target);
      this.#sockets.add(client);
      this.#sockets.add(upstream);
      const drop = (): void => {
        client.destroy();
        upstream.destroy();
        this.#sockets.delete(client);
        this.#sockets.delete(upstream);
      };
      client.on("error", drop).on("close", drop);
      upstream.on("error", drop).on("close", drop);
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.port, "127.0.0.1", () => resolve());
    });
    this.#server = server;
  }

  /** Drops every connection and stops listening. */
  async cut(): Promise<void> {
    const server = this.#server;
    this.#server = undefined;
    for (const socket of this.#sockets) {
      socket.destroy();
    }
    this.#sockets.clear();
    if (server !== undefined) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  }
}
