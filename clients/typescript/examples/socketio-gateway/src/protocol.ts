/**
 * The Socket.IO protocol between the gateway and the browser.
 *
 * Browser → gateway, in the handshake only: `auth: { token, lastSeq }`.
 * `lastSeq` is the last `seq` the page applied ("0" for a fresh page). A
 * fresh page gets a `snapshot` (the tenant's rows, from walcast's state
 * bucket) then the events after it; a reconnecting page gets the events
 * after its `lastSeq` (or, when those are gone, a `resync` and a snapshot);
 * then live events.
 */

import type { ChangeEventJson } from "@walcast/client";
import type { Server, Socket } from "socket.io";

export interface ServerToClientEvents {
  /** Right after the handshake: who the gateway says you are. */
  hello(info: { tenant: string }): void;
  /**
   * The tenant's current rows (each row's latest event; its `task`,
   * `project` or `lock` is the row), as of `asOfSeq`: replace the page's
   * state with them. Events from `asOfSeq + 1` follow.
   */
  snapshot(info: { asOfSeq: string; rows: ChangeEventJson[] }): void;
  /** One event, proto3 JSON mapping (`seq` is a decimal string), in `seq` order. */
  change(event: ChangeEventJson): void;
  /** Caught up: everything up to `seq` was sent; events now arrive live. */
  live(info: { seq: string }): void;
  /**
   * The page's state cannot be brought up to date by events alone. `too_old`:
   * events after the page's `lastSeq` left the stream; `ahead`: the page's
   * `lastSeq` is unknown to this stream. A `snapshot` follows.
   */
  resync(info: { reason: "too_old" | "ahead" }): void;
  /** The gateway's own link to NATS. */
  upstream(info: { state: "connected" | "reconnecting" }): void;
}

// The browser sends nothing after the handshake.
export type ClientToServerEvents = Record<string, never>;

export interface SocketData {
  tenant: string;
  lastSeq: bigint;
}

export type GatewayServer = Server<ClientToServerEvents, ServerToClientEvents, Record<string, never>, SocketData>;
export type GatewaySocket = Socket<ClientToServerEvents, ServerToClientEvents, Record<string, never>, SocketData>;
