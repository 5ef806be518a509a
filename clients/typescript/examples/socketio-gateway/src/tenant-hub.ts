/**
 * One relay per tenant: a single walcast subscription whose events go to the
 * Socket.IO room `tenant:<id>`, plus the hand-over that gives a new browser
 * the tenant's rows (from walcast's state bucket, with `loadAndFollow`) and
 * lets a reconnecting one resume from its last `seq`, without a gap or a
 * reorder.
 *
 * Hand-over invariant: a socket joins the room only at a moment when it has
 * been sent every event up to the hub's position. Its own feed (a
 * `loadAndFollow` snapshot and the events after it, or a subscription from
 * the browser's `lastSeq`) runs until it reaches what the hub has relayed;
 * the join happens synchronously right then, so the next event the hub
 * relays (in a later tick) reaches the socket too. The feed may run ahead
 * of the hub, so the browser ignores `seq`s it has already applied.
 */

import type { NatsConnection } from "@nats-io/transport-node";
import type { LoadItem, Subscription } from "@walcast/client";
import { loadAndFollow, subscribe, toJSON } from "@walcast/client";

import type { GatewayServer, GatewaySocket } from "./protocol.js";

export interface HubOptions {
  io: GatewayServer;
  nc: NatsConnection;
  tenant: string;
  subjectPrefix: string;
  /** walcast's state bucket (`--state-bucket`); the client's default when undefined. */
  stateBucket: string | undefined;
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
          // Only on a repair whose events aged out: the room missed them too.
          // Its pages reconnect and, their events being gone, reload the rows.
          this.#position = item.oldestSeq - 1n;
          io.in(this.room).disconnectSockets(true);
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

  /**
   * Brings `socket` up to date, then joins it to the room: a fresh page
   * (`lastSeq` 0) gets the tenant's rows from walcast's state bucket, a
   * reconnecting page the events after its `lastSeq`, or the rows again when
   * those events are gone.
   */
  async attach(socket: GatewaySocket, lastSeq: bigint): Promise<void> {
    this.#sockets++;
    clearTimeout(this.#idleTimer);
    socket.once("disconnect", () => this.#detach());
    await this.#ready;
    if (socket.disconnected) {
      return;
    }
    if (lastSeq === 0n) {
      await this.#load(socket);
      return;
    }
    if (lastSeq > (this.#position as bigint)) {
      // Not a seq of this stream (database reset, another deployment).
      socket.emit("resync", { reason: "ahead" });
      await this.#load(socket);
      return;
    }
    if (lastSeq === this.#position) {
      this.#join(socket, lastSeq);
      return;
    }
    const outcome = await this.#follow(
      socket,
      subscribe({
        connection: this.#options.nc,
        tenant: this.#options.tenant,
        afterSeq: lastSeq,
        subjectPrefix: this.#options.subjectPrefix,
      }),
      lastSeq,
    );
    if (outcome === "too_old") {
      // The events the page needs left the stream: its rows come from the state.
      socket.emit("resync", { reason: "too_old" });
      await this.#load(socket);
    }
  }

  /** Sends `socket` the tenant's rows and the events after them, then joins it. */
  async #load(socket: GatewaySocket): Promise<void> {
    for (let attempt = 0; attempt < 3; attempt++) {
      const load = loadAndFollow({
        connection: this.#options.nc,
        tenant: this.#options.tenant,
        subjectPrefix: this.#options.subjectPrefix,
        ...(this.#options.stateBucket === undefined ? {} : { stateBucket: this.#options.stateBucket }),
      });
      if ((await this.#follow(socket, load, undefined)) !== "too_old") {
        return;
      }
      // Events after the snapshot aged out while it was read: read it again.
      socket.emit("resync", { reason: "too_old" });
    }
    socket.disconnect(true); // the page reconnects and tries again
  }

  /**
   * Relays `feed` (a snapshot, then events) to `socket` until it has reached
   * what the room was sent, then joins the socket to the room. `"too_old"`
   * when the feed reports events that aged out (nothing joined).
   */
  async #follow(
    socket: GatewaySocket,
    feed: Subscription<LoadItem>,
    after: bigint | undefined,
  ): Promise<"joined" | "too_old" | "ended"> {
    const stop = (): void => void feed.close();
    socket.once("disconnect", stop);
    // `undefined` until the snapshot arrived (load) or the starting point (resume).
    let sent = after;
    try {
      for await (const item of feed) {
        if (socket.disconnected) {
          return "ended";
        }
        if (this.#stopped) {
          socket.disconnect(true); // the page reconnects to a fresh relay
          return "ended";
        }
        if (item.type === "snapshot") {
          socket.emit("snapshot", { asOfSeq: item.asOfSeq.toString(), rows: [...item.rows.values()].map((row) => toJSON(row)) });
          sent = item.asOfSeq;
        } else if (item.type === "event") {
          socket.emit("change", toJSON(item.event));
          sent = item.event.seq;
        } else if (item.type === "resync") {
          return "too_old";
        }
        // Synchronous check-and-join: no hub event can slip in between.
        if (sent !== undefined && sent >= (this.#position as bigint)) {
          this.#join(socket, sent);
          return "joined";
        }
      }
      return "ended";
    } catch (err) {
      console.error(`gateway: tenant ${this.#options.tenant}: feed after ${after ?? "snapshot"} failed: ${(err as Error).message}`);
      socket.disconnect(true);
      return "ended";
    } finally {
      socket.off("disconnect", stop);
      await feed.close();
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
