/**
 * Reading walcast's state bucket (SPEC §8, `docs/STATE.md`): wait until the
 * backfill is complete, then read one tenant's current keys as a set that is
 * exactly the tenant's rows after some `seq`.
 *
 * Why the set is exact: walcast is the bucket's only writer and writes keys
 * in stream order, so the bucket always holds "the rows after a prefix of the
 * stream". An ordered consumer with deliver policy "last per subject"
 * delivers the keys as they were when it was created, then every later write
 * in stream order; keeping the last message per key until nothing is pending
 * gives the bucket as it was at one moment. The highest `Walcast-Seq` of that
 * set (delete markers included) is the tenant's last event it reflects:
 * `asOfSeq`. Rows with `Walcast-Seq: 0` were copied by the backfill and have
 * no event up to `asOfSeq`, so their copy is current.
 *
 * This holds only once the backfill is complete, hence the marker
 * `_walcast.backfill`: a load waits until it says `complete`, and reads it
 * again after the rows; if its revision changed (the bucket was purged and is
 * being filled again) the load starts over.
 *
 * No Node-only APIs here: this runs in browsers too.
 *
 * @module
 */

import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { DeliverPolicy } from "@nats-io/jetstream";
import type { Msg, MsgHdrs, NatsConnection } from "@nats-io/nats-core";

import { StateNotReadyError, WalcastError } from "./errors.js";
import type { ChangeEvent } from "./gen/walcast/v1/events_pb.js";
import { decodeChangeEvent } from "./decode.js";
import type { OversizedEvents } from "./reader.js";
import { headerName, headerValues, indexOf, rawParts, text } from "./rawmsg.js";
import { filteredConsumer, OBJECT_HEADER, ObjectMissingError } from "./reader.js";
import { PullBroken, pullAll } from "./pull.js";

/** The readiness marker's key: two tokens, never a row key (three or more). */
const MARKER_KEY = "_walcast.backfill";

/** Longest silence while messages are still pending before a read is retried. */
const STALL_MS = 10_000;

/** Messages per pull request while reading a tenant's keys. */
const PULL_BATCH = 512;

/** A tenant's rows as of `asOfSeq`, keyed by state key. */
export interface TenantState {
  readonly asOfSeq: bigint;
  readonly rows: Map<string, ChangeEvent>;
}

/** A failure worth retrying (consumer broke, backfill restarted meanwhile). */
export class TransientStateFailure extends Error {
  override readonly name = "TransientStateFailure";
}

/** What a load needs; `signal` aborts every wait (the subscription closed). */
export interface StateContext {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  readonly oversized: OversizedEvents;
  readonly bucket: string;
  readonly signal: AbortSignal;
  readonly logger: { info(message: string): void };
}

/** The marker as last written: `state` undefined when absent or deleted. */
interface Marker {
  readonly state: string | undefined;
  /** Its stream sequence: a new backfill writes a new one. */
  readonly revision: number;
}

const decoder = new TextDecoder();

function kvStream(bucket: string): string {
  return `KV_${bucket}`;
}

function kvSubject(bucket: string, key: string): string {
  return `$KV.${bucket}.${key}`;
}

function isDeleteOp(op: string): boolean {
  return op === "DEL" || op === "PURGE";
}

function isDelete(headers: MsgHdrs | undefined): boolean {
  return isDeleteOp(headers?.get("KV-Operation") ?? "");
}

function parseMarker(headers: MsgHdrs | undefined, data: Uint8Array, revision: number): Marker {
  if (isDelete(headers)) {
    return { state: undefined, revision };
  }
  try {
    const body = JSON.parse(decoder.decode(data)) as { state?: unknown };
    return { state: typeof body.state === "string" ? body.state : "unreadable", revision };
  } catch {
    return { state: "unreadable", revision };
  }
}

/** The marker now, by a direct get (no consumer). Rejects if the bucket is unreachable. */
async function currentMarker(ctx: StateContext): Promise<Marker> {
  const msg = await ctx.jsm.direct.getMessage(kvStream(ctx.bucket), {
    last_by_subj: kvSubject(ctx.bucket, MARKER_KEY),
  });
  return msg === null ? { state: undefined, revision: 0 } : parseMarker(msg.header, msg.data, msg.seq);
}

/** Resolves after `ms` or when `signal` aborts, whichever comes first. */
function delay(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}

/**
 * The marker's revision once it says `complete`; a {@link StateNotReadyError}
 * when `deadline` (epoch ms) passes first. Looks once, then watches the key.
 */
export async function waitUntilComplete(ctx: StateContext, tenant: string, deadline: number): Promise<number> {
  let lastState: string | undefined;
  try {
    const marker = await currentMarker(ctx);
    if (marker.state === "complete") {
      return marker.revision;
    }
    lastState = marker.state;
  } catch {
    // No bucket (yet): watch below, retrying until the deadline.
  }
  ctx.logger.info(`walcast: waiting for the state backfill of ${ctx.bucket} (marker: ${lastState ?? "absent"})`);
  for (let attempt = 0; Date.now() < deadline && !ctx.signal.aborted; attempt++) {
    const watched = await watchMarker(ctx, deadline, (state) => (lastState = state)).catch(() => undefined);
    if (watched !== undefined) {
      return watched;
    }
    await delay(Math.min(100 * 2 ** Math.min(attempt, 4), Math.max(0, deadline - Date.now())), ctx.signal);
  }
  throw new StateNotReadyError(ctx.bucket, tenant, lastState);
}

/** Watches the marker until it is complete (its revision) or the deadline (`undefined`). */
async function watchMarker(
  ctx: StateContext,
  deadline: number,
  seen: (state: string | undefined) => void,
): Promise<number | undefined> {
  const { consumer } = await filteredConsumer(ctx.js, kvStream(ctx.bucket), kvSubject(ctx.bucket, MARKER_KEY), {
    deliver_policy: DeliverPolicy.LastPerSubject,
  });
  const messages = await consumer.consume({ max_messages: 16, abort_on_missing_resource: true });
  const stop = (): void => messages.stop();
  const timer = setTimeout(stop, Math.max(0, deadline - Date.now()));
  ctx.signal.addEventListener("abort", stop, { once: true });
  try {
    for await (const msg of messages) {
      const marker = parseMarker(msg.headers, msg.data, msg.info.streamSequence);
      if (marker.state === "complete") {
        return marker.revision;
      }
      seen(marker.state);
    }
    return undefined;
  } finally {
    clearTimeout(timer);
    ctx.signal.removeEventListener("abort", stop);
    messages.stop();
    consumer.delete().catch(() => {});
  }
}

/**
 * The key of a row's subject (`prefix` = `$KV.<bucket>.`); `undefined` for
 * the marker (a tenant named `_walcast`): a row key has three tokens or more.
 */
function rowKey(prefix: string, subject: string): string | undefined {
  const key = subject.slice(prefix.length);
  const first = key.indexOf(".");
  return first >= 0 && key.indexOf(".", first + 1) >= 0 ? key : undefined;
}

/** {@link rowKey} of a subject's bytes. */
function rawRowKey(prefixLength: number, subject: Uint8Array): string | undefined {
  const end = subject.length;
  const first = indexOf(subject, DOT, prefixLength, end);
  return first >= 0 && indexOf(subject, DOT, first + 1, end) >= 0 ? text(subject, prefixLength, end) : undefined;
}

const DOT = 0x2e;

function malformed(key: string, reason: string): WalcastError {
  return new WalcastError("decode", `state key ${key}: ${reason}`);
}

/** The headers a row's message is read for, their values going into `wantedValues` in this order. */
const WANTED = [headerName("Walcast-Seq"), headerName("KV-Operation"), headerName(OBJECT_HEADER)];
/** Their values in the message being read (reused). */
const wantedValues = ["", "", ""];

/**
 * Records a row's message in `rows` (a later message of its key replaces
 * it); the marker's is skipped. Reads nats.js' bytes when it can
 * (`rawmsg.ts`), else its public API.
 */
export function recordRow(prefix: string, msg: Msg, rows: RowsBuilder): void {
  const raw = rawParts(msg);
  let key: string | undefined;
  let bytes: Uint8Array;
  let start = 0;
  if (raw !== undefined) {
    key = rawRowKey(prefix.length, raw.subject);
    if (key === undefined) {
      return;
    }
    headerValues(raw, WANTED, wantedValues);
    bytes = raw.bytes;
    start = raw.headerEnd;
  } else {
    key = rowKey(prefix, msg.subject);
    if (key === undefined) {
      return;
    }
    const headers = msg.headers;
    wantedValues[0] = headers?.get("Walcast-Seq") ?? "";
    wantedValues[1] = headers?.get("KV-Operation") ?? "";
    wantedValues[2] = headers?.get(OBJECT_HEADER) ?? "";
    bytes = msg.data;
  }
  const [seq, op, object] = wantedValues as [string, string, string];
  if (!/^\d+$/.test(seq)) {
    throw malformed(key, `Walcast-Seq header ${JSON.stringify(seq)} is not a seq`);
  }
  if (isDeleteOp(op)) {
    rows.remove(key, BigInt(seq));
  } else {
    rows.put(key, BigInt(seq), object, bytes, start);
  }
}

/** A value decided after the read: an oversized one to fetch, or one that did not decode. */
type Deferred = { readonly seq: bigint; readonly object: string } | { readonly error: WalcastError };

/**
 * A tenant's rows as the read goes: each key's last message, decoded as it
 * arrives (so the receive buffers die young instead of being held until the
 * end). Oversized values are fetched, and decode failures reported, only
 * for messages no later one replaced.
 */
export class RowsBuilder {
  readonly rows = new Map<string, ChangeEvent>();
  /** The highest `Walcast-Seq` read, delete markers included. */
  asOfSeq = 0n;
  readonly #deferred = new Map<string, Deferred>();

  constructor(readonly tenant: string) {}

  /** A key's value: `bytes[start..]`, or the object named `object` (oversized) unless it is "". */
  put(key: string, seq: bigint, object: string, bytes: Uint8Array, start: number): void {
    this.#saw(seq);
    if (this.#deferred.size > 0) {
      this.#deferred.delete(key);
    }
    if (object !== "") {
      this.rows.delete(key);
      this.#deferred.set(key, { seq, object });
      return;
    }
    let event: ChangeEvent;
    try {
      event = decodeRow(this.tenant, key, seq, bytes, start);
    } catch (err) {
      this.rows.delete(key);
      this.#deferred.set(key, { error: err as WalcastError });
      return;
    }
    this.rows.set(key, event); // replaces the key's earlier row, if any
  }

  /** A key's delete marker. */
  remove(key: string, seq: bigint): void {
    this.#saw(seq);
    this.rows.delete(key);
    if (this.#deferred.size > 0) {
      this.#deferred.delete(key);
    }
  }

  #saw(seq: bigint): void {
    if (seq > this.asOfSeq) {
      this.asOfSeq = seq;
    }
  }

  /** The rows, once the deferred values are fetched and decoded. */
  async finish(ctx: StateContext): Promise<TenantState> {
    for (const [key, deferred] of this.#deferred) {
      if ("error" in deferred) {
        throw deferred.error;
      }
      const bytes = await fetchValue(ctx, deferred.object);
      this.rows.set(key, decodeRow(this.tenant, key, deferred.seq, bytes));
    }
    return { asOfSeq: this.asOfSeq, rows: this.rows };
  }
}

/** A row's value, checked against its key's tenant and `Walcast-Seq`. */
function decodeRow(tenant: string, key: string, seq: bigint, bytes: Uint8Array, start = 0): ChangeEvent {
  let event: ChangeEvent;
  try {
    event = decodeChangeEvent(bytes, start);
  } catch (err) {
    throw new WalcastError("decode", `state key ${key} is not a walcast.v1.ChangeEvent`, { cause: err });
  }
  if (event.tenantId !== tenant || event.seq !== seq) {
    throw malformed(key, `Walcast-Seq ${seq} of ${tenant}, but the value is seq ${event.seq} of ${event.tenantId}`);
  }
  return event;
}

/**
 * Every current key of the tenant, read until nothing is pending (see
 * `pull.ts`). Rejects with {@link TransientStateFailure} when the read broke
 * (retry), a `WalcastError` for a malformed value.
 */
async function readTenant(ctx: StateContext, tenant: string): Promise<RowsBuilder> {
  const stream = kvStream(ctx.bucket);
  const { consumer, name, numPending } = await filteredConsumer(ctx.js, stream, kvSubject(ctx.bucket, `${tenant}.>`), {
    deliver_policy: DeliverPolicy.LastPerSubject,
  });
  const rows = new RowsBuilder(tenant);
  const prefix = kvSubject(ctx.bucket, "");
  try {
    await pullAll({
      nc: ctx.nc,
      stream,
      consumer: name,
      numPending,
      batch: PULL_BATCH,
      stallMs: STALL_MS,
      signal: ctx.signal,
      onMessage: (msg) => recordRow(prefix, msg, rows),
    });
    return rows;
  } catch (err) {
    if (err instanceof PullBroken) {
      throw new TransientStateFailure(ctx.signal.aborted ? "closed" : `reading ${tenant}'s keys: ${err.message}`);
    }
    throw err;
  } finally {
    consumer.delete().catch(() => {});
  }
}

/**
 * An oversized value's body. walcast deletes a value's object once its key
 * holds a newer value: gone means the key moved on during the read, and the
 * load starts over.
 */
async function fetchValue(ctx: StateContext, object: string): Promise<Uint8Array> {
  try {
    return await ctx.oversized.fetch(object);
  } catch (err) {
    if (err instanceof ObjectMissingError) {
      throw new TransientStateFailure(`${object} was replaced during the read`);
    }
    throw err;
  }
}

/**
 * One attempt: the rows after the marker said complete (`revision`), checked
 * against the marker afterwards. Rejects with {@link TransientStateFailure}
 * when it should be retried.
 */
export async function readConsistent(ctx: StateContext, tenant: string, revision: number): Promise<TenantState> {
  const rows = await readTenant(ctx, tenant);
  const marker = await currentMarker(ctx).catch((err: unknown) => {
    throw new TransientStateFailure(`re-reading the backfill marker: ${String(err)}`);
  });
  if (marker.state !== "complete" || marker.revision !== revision) {
    throw new TransientStateFailure("the backfill marker changed during the read (bucket purged or backfill restarted)");
  }
  return rows.finish(ctx);
}
