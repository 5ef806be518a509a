/**
 * One relay per tenant: a single walcast subscription whose events go to the
 * Socket.IO room `tenant:<id>`, plus the hand-over that lets a reconnecting
 * browser resume from its last `seq` without a gap or a reorder.
 *
 * Hand-over invariant: a socket joins the room only at a moment when it has
 * been sent every event up to the hub's position. The replay (its own
 * subscription from the browser's `lastSeq`) runs until its events reach
 * what the hub has relayed; the join happens synchronously right then, so
 * the next event the hub relays (in a later tick) reaches the socket too.
 * The replay may run ahead of the hub, so the browser ignores `seq`s it has
 * already applied.
 */

import type { NatsConnection } from "@nats-io/transport-node";
import type { Subscription } from "@walcast/client";
import { subscribe, toJSON } from "@walcast/client";

import type { GatewayServer, GatewaySocket } from "./protocol.js";

export interface HubOptions {
  io: GatewayServer;
  nc: NatsConnection;
  tenant: string;
  subjectPrefix: string;
  idleMs: number;
  /** Called once the hub has stopped (idle or failed); the server forgets it. */
  onStop: () => void;
}

export class TenantHub {
  readonly room: string;
  readonly #options: HubOptions;
  readonly #subscription: Subscription;
  /** Last seq relayed to the room; set once live. */
  #position: bigint | undefined;
  readonly #ready: Promise<void>;
  #markReady!: () => void;
  #fail!: (err: Error) => void;
  #sockets = 0;
  #idleTimer: NodeJS.Timeout | undefined;
  #stopped = false;

  constructor(options: HubOptions) {
    this.#options = options;
    this.room = `tenant:${options.tenant}`;
    this.#ready = new Promise((resolve, reject) => {
      this.#markReady = resolve;
      this.#fail = reject;
    });
    this.#ready.catch(() => {});
    const { io, tenant } = options;
    this.#subscription = subscribe(
      { connection: options.nc, tenant, afterSeq: "latest", subjectPrefix: options.subjectPrefix },
      {
        onEvent: (event) => {
          this.#position = event.seq;
          io.to(this.room).emit("change", toJSON(event));
        },
        onLive: (item) => {
          this.#position = item.seq ?? 0n;
          this.#markReady();
        },
        onResync: (item) => {
          // Only on a repair whose events aged out: tell everyone.
          this.#position = item.oldestSeq - 1n;
          io.to(this.room).emit("resync", { reason: "too_old", oldestSeq: item.oldestSeq.toString() });
        },
        onError: (err) => {
          console.error(`gateway: tenant ${tenant}: relay failed: ${err.message}`);
          this.#fail(err);
          // Browsers reconnect and resume by seq through a fresh hub.
          void this.stop();
          io.in(this.room).disconnectSockets(true);
        },
      },
    );
  }

  /** Sends `socket` what it missed after `lastSeq`, then joins it to the room. */
  async attach(socket: GatewaySocket, lastSeq: bigint): Promise<void> {
    this.#sockets++;
    clearTimeout(this.#idleTimer);
    socket.once("disconnect", () => this.#detach());
    await this.#ready;
    if (socket.disconnected) {
      return;
    }
    let after = lastSeq;
    if (after > (this.#position as bigint)) {
      // Not a seq of this stream (database reset, another deployment).
      socket.emit("resync", { reason: "ahead", oldestSeq: "1" });
      after = 0n;
    }
    if (after === this.#position) {
      this.#join(socket, after);
      return;
    }
    await this.#replay(socket, after);
  }

  async #replay(socket: GatewaySocket, after: bigint): Promise<void> {
    const replay = subscribe({
      connection: this.#options.nc,
      tenant: this.#options.tenant,
      afterSeq: after,
      subjectPrefix: this.#options.subjectPrefix,
    });
    const stop = (): void => void replay.close();
    socket.once("disconnect", stop);
    let sent = after;
    try {
      for await (const item of replay) {
        if (socket.disconnected) {
          return;
        }
        if (this.#stopped) {
          socket.disconnect(true); // the page reconnects to a fresh relay
          return;
        }
        if (item.type === "event") {
          socket.emit("change", toJSON(item.event));
          sent = item.event.seq;
        } else if (item.type === "resync") {
          socket.emit("resync", { reason: "too_old", oldestSeq: item.oldestSeq.toString() });
          sent = item.oldestSeq - 1n;
        }
        // Synchronous check-and-join: no hub event can slip in between.
        if (sent >= (this.#position as bigint)) {
          this.#join(socket, sent);
          return;
        }
      }
    } catch (err) {
      console.error(`gateway: tenant ${this.#options.tenant}: replay after ${after} failed: ${(err as Error).message}`);
      socket.disconnect(true);
    } finally {
      socket.off("disconnect", stop);
      await replay.close();
    }
  }

  #join(socket: GatewaySocket, sent: bigint): void {
    if (this.#stopped) {
      socket.disconnect(true); // the page reconnects to a fresh relay
      return;
    }
    void socket.join(this.room);
    socket.emit("live", { seq: sent.toString() });
  }

  #detach(): void {
    this.#sockets--;
    if (this.#sockets === 0 && !this.#stopped) {
      this.#idleTimer = setTimeout(() => void this.stop(), this.#options.idleMs);
    }
  }

  async stop(): Promise<void> {
    if (this.#stopped) {
      return;
    }
    this.#stopped = true;
    clearTimeout(this.#idleTimer);
    this.#options.onStop();
    await this.#subscription.close();
  }
}
