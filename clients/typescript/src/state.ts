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

import type { ConsumerMessages, JetStreamClient, JetStreamManager, JsMsg } from "@nats-io/jetstream";
import { DeliverPolicy } from "@nats-io/jetstream";
import type { MsgHdrs } from "@nats-io/nats-core";

import { StateNotReadyError, WalcastError } from "./errors.js";
import type { ChangeEvent } from "./gen/walcast/v1/events_pb.js";
import { decodeChangeEvent } from "./decode.js";
import type { OversizedEvents } from "./reader.js";
import { filteredConsumer, OBJECT_HEADER, ObjectMissingError } from "./reader.js";

/** The readiness marker's key: two tokens, never a row key (three or more). */
const MARKER_KEY = "_walcast.backfill";

/** Longest silence while messages are still pending before a read is retried. */
const STALL_MS = 10_000;

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

function isDelete(headers: MsgHdrs | undefined): boolean {
  const op = headers?.get("KV-Operation") ?? "";
  return op === "DEL" || op === "PURGE";
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

/** A key's last message, not decoded yet (a later one may replace it). */
interface Latest {
  readonly seq: bigint;
  /** `undefined` for a delete marker. */
  readonly data: Uint8Array | undefined;
  readonly object: string;
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

function malformed(key: string, reason: string): WalcastError {
  return new WalcastError("decode", `state key ${key}: ${reason}`);
}

function latestOf(key: string, msg: JsMsg): Latest {
  const header = msg.headers?.get("Walcast-Seq") ?? "";
  if (!/^\d+$/.test(header)) {
    throw malformed(key, `Walcast-Seq header ${JSON.stringify(header)} is not a seq`);
  }
  const data = isDelete(msg.headers) ? undefined : msg.data;
  return { seq: BigInt(header), data, object: msg.headers?.get(OBJECT_HEADER) ?? "" };
}

/**
 * Every current key of the tenant, read until nothing is pending. Rejects
 * with {@link TransientStateFailure} when the read broke (retry), a
 * `WalcastError` for a malformed value.
 */
async function readTenant(ctx: StateContext, tenant: string): Promise<Map<string, Latest>> {
  const { consumer, numPending } = await filteredConsumer(
    ctx.js,
    kvStream(ctx.bucket),
    kvSubject(ctx.bucket, `${tenant}.>`),
    { deliver_policy: DeliverPolicy.LastPerSubject },
  );
  const latest = new Map<string, Latest>();
  let messages: ConsumerMessages | undefined;
  try {
    messages = await consumer.consume({ max_messages: 512, abort_on_missing_resource: true });
    if (numPending === 0) {
      return latest;
    }
    const prefix = kvSubject(ctx.bucket, "");
    // A message's `pending` is what is left after it; writes meanwhile only
    // add to it. So the next message that can be the last is `pending`
    // messages on, and the delivery info (a parse of the reply subject) is
    // read only there, not for every message.
    let received = 0;
    let lastAt = 1;
    const stalled = stallGuard(messages, () => received);
    try {
      for await (const msg of messages) {
        received++;
        const key = rowKey(prefix, msg.subject);
        if (key !== undefined) {
          latest.set(key, latestOf(key, msg));
        }
        if (received === lastAt) {
          const pending = msg.info.pending;
          if (pending === 0) {
            return latest;
          }
          lastAt = received + pending;
        }
      }
    } finally {
      stalled.clear();
    }
    throw new TransientStateFailure(ctx.signal.aborted ? "closed" : `reading ${tenant}'s keys stalled or ended`);
  } finally {
    messages?.stop();
    consumer.delete().catch(() => {});
  }
}

/**
 * Stops `messages` once {@link STALL_MS} pass without a message. It checks
 * a count once a second instead of re-arming a timer per message.
 */
function stallGuard(messages: ConsumerMessages, received: () => number): { clear(): void } {
  let seen = 0;
  let quietSince = Date.now();
  const timer = setInterval(() => {
    const now = Date.now();
    if (received() !== seen) {
      seen = received();
      quietSince = now;
    } else if (now - quietSince >= STALL_MS) {
      messages.stop();
    }
  }, 1_000);
  return {
    clear() {
      clearInterval(timer);
    },
  };
}

/** Decodes the values (fetching oversized ones); `asOfSeq` counts delete markers too. */
async function decodeRows(ctx: StateContext, tenant: string, latest: Map<string, Latest>): Promise<TenantState> {
  let asOfSeq = 0n;
  const rows = new Map<string, ChangeEvent>();
  for (const [key, { seq, data, object }] of latest) {
    asOfSeq = seq > asOfSeq ? seq : asOfSeq;
    if (data === undefined) {
      continue;
    }
    const bytes = object === "" ? data : await fetchValue(ctx, object);
    let event: ChangeEvent;
    try {
      event = decodeChangeEvent(bytes);
    } catch (err) {
      throw new WalcastError("decode", `state key ${key} is not a walcast.v1.ChangeEvent`, { cause: err });
    }
    if (event.tenantId !== tenant || event.seq !== seq) {
      throw malformed(key, `Walcast-Seq ${seq} of ${tenant}, but the value is seq ${event.seq} of ${event.tenantId}`);
    }
    rows.set(key, event);
  }
  return { asOfSeq, rows };
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
  const latest = await readTenant(ctx, tenant);
  const marker = await currentMarker(ctx).catch((err: unknown) => {
    throw new TransientStateFailure(`re-reading the backfill marker: ${String(err)}`);
  });
  if (marker.state !== "complete" || marker.revision !== revision) {
    throw new TransientStateFailure("the backfill marker changed during the read (bucket purged or backfill restarted)");
  }
  return decodeRows(ctx, tenant, latest);
}
