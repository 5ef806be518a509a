/**
 * The subscription engine: turns stream messages into the ordered,
 * duplicate-free items the application sees.
 *
 * Flow: plan the start (catch-up service for one tenant; stream position for
 * all) → read with an ordered consumer → judge each event (`positions.ts`):
 * deliver, drop a duplicate, or repair a gap first. A repair asks the
 * catch-up service where the missing events are, reads them with a second,
 * short-lived consumer, delivers them, and only then the event that revealed
 * the gap; so order is kept. A `too_old` answer becomes a `resync` item and
 * the tenant continues with the oldest event still held.
 *
 * Invariant: an item is yielded only from `#handle`, `#repair`, `#resync` and
 * `#goLive`, and events only after `Positions.judge` said "deliver".
 *
 * Reconnects: when the NATS connection comes back, every reader is reopened
 * right after the last stream message it delivered (the ordered consumer's
 * own recovery can wait up to 30 s when JetStream is still starting). The
 * `seq` check turns anything the broker lost or reordered meanwhile into a
 * gap, repaired as above; no reconnect ever depends on the catch-up service
 * being up.
 *
 * Transient failures (NATS down, stream missing, catch-up service silent)
 * are retried forever with capped, jittered exponential backoff; `close()`
 * interrupts every wait through one AbortController.
 *
 * @module
 */

import type { JetStreamClient } from "@nats-io/jetstream";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/nats-core";

import type { CatchupAnswer, CatchupPlan } from "./catchup.js";
import { TransientCatchupFailure, catchupSubject, requestCatchup } from "./catchup.js";
import { GapError, WalcastError } from "./errors.js";
import type { LoadItem, SnapshotItem, SubscriptionItem, SubscriptionStats } from "./items.js";
import type { Settings } from "./options.js";
import { Positions } from "./positions.js";
import type { ReadFrom, StreamEvent } from "./reader.js";
import { OversizedEvents, Reader } from "./reader.js";
import type { StateContext } from "./state.js";
import { readConsistent, waitUntilComplete } from "./state.js";

/** Thrown inside the pump when `close()` interrupts a wait. */
const CLOSED = Symbol("closed");

/** Where the main reader starts. */
interface Start {
  stream: string;
  filter: string;
  from: ReadFrom;
}

/** Capped exponential backoff with full jitter: 100 ms · 2^attempt, at most `cap`. */
export function backoff(attempt: number, cap: number): number {
  const ceiling = Math.min(cap, 100 * 2 ** Math.min(attempt, 16));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** Runs at most `limit` tasks at a time; results in input order. */
async function pool<T, R>(items: readonly T[], limit: number, task: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) {
      const index = next++;
      results[index] = await task(items[index] as T);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

export class Pump {
  readonly stats: SubscriptionStats = {
    delivered: 0,
    duplicates: 0,
    gapsRepaired: 0,
    resyncs: 0,
    consumers: 0,
  };

  readonly #settings: Settings;
  readonly #abort = new AbortController();
  readonly #closeSignal: Promise<typeof CLOSED>;
  readonly #readers = new Set<Reader>();
  readonly #positions: Positions;
  #nc: NatsConnection | undefined;
  #js: JetStreamClient | undefined;
  #oversized: OversizedEvents | undefined;
  #live = false;
  #stopWatching: (() => void) | undefined;

  constructor(settings: Settings) {
    this.#settings = settings;
    this.#closeSignal = new Promise((resolve) => {
      this.#abort.signal.addEventListener("abort", () => resolve(CLOSED), { once: true });
    });
    if (settings.tenant !== undefined) {
      this.#positions = new Positions(
        settings.dedupWindow,
        0n,
        new Map([[settings.tenant, settings.afterSeq === "latest" ? 0n : settings.afterSeq]]),
      );
    } else {
      // All tenants: "latest" and resumed subscriptions take each unlisted
      // tenant's first event as its baseline; from the start, seq 1 is due.
      const baseline = settings.afterSeq === "latest" || settings.positions.size > 0;
      this.#positions = new Positions(settings.dedupWindow, baseline ? undefined : 0n, settings.positions);
    }
  }

  /** Interrupts every wait and stops the readers; `run()` then returns. */
  abort(): void {
    if (!this.#abort.signal.aborted) {
      this.#abort.abort();
      for (const reader of this.#readers) {
        reader.stop();
      }
    }
  }

  get #closing(): boolean {
    return this.#abort.signal.aborted;
  }

  /** The items, in order. Ends on `abort()`; throws a `WalcastError` on failure. */
  async *run(): AsyncGenerator<LoadItem, void, undefined> {
    try {
      const nc = await this.#connect();
      this.#watchReconnects(nc);
      this.#js = jetstream(nc);
      this.#oversized = new OversizedEvents(this.#js);
      yield* this.#main();
    } catch (err) {
      if (err === CLOSED || this.#closing) {
        return;
      }
      if (err instanceof WalcastError) {
        throw err;
      }
      throw new WalcastError(
        "unexpected",
        `subscription failed: ${err instanceof Error ? err.message : String(err)}`,
        { cause: err },
      );
    } finally {
      this.#stopWatching?.();
      for (const reader of this.#readers) {
        reader.stop();
      }
      this.#readers.clear();
      if (this.#nc !== undefined && this.#settings.connection === undefined) {
        await this.#nc.close().catch(() => {});
      }
    }
  }

  // --- waiting, interruptibly ------------------------------------------------

  async #guard<T>(promise: Promise<T>): Promise<T> {
    promise.catch(() => {});
    const result = await Promise.race([promise, this.#closeSignal]);
    if (result === CLOSED) {
      throw CLOSED;
    }
    return result as T;
  }

  /** Waits `ms`; throws `CLOSED` when `close()` interrupts it. (No Node timers API: browsers too.) */
  async #pause(ms: number): Promise<void> {
    const signal = this.#abort.signal;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      signal.addEventListener("abort", done, { once: true });
    });
    if (signal.aborted) {
      throw CLOSED;
    }
  }

  async #connect(): Promise<NatsConnection> {
    if (this.#settings.connection !== undefined) {
      this.#nc = this.#settings.connection;
      return this.#nc;
    }
    // Loaded only here, so a browser that passes its own (WebSocket)
    // `connection` never needs the Node transport.
    const { connect } = await import("@nats-io/transport-node");
    // Our own first-connect loop instead of `waitOnFirstConnect`, which
    // cannot be cancelled: close() must stop a subscription whose server
    // never came up. Once connected, the client reconnects by itself.
    for (let attempt = 0; ; attempt++) {
      const connecting = connect({
        servers: this.#settings.servers,
        maxReconnectAttempts: -1,
        ...this.#settings.connectOptions,
      });
      // If close() wins the race, the connection may still open later.
      connecting.then((nc) => (this.#closing ? nc.close() : undefined)).catch(() => {});
      try {
        this.#nc = await this.#guard(connecting);
        return this.#nc;
      } catch (err) {
        if (err === CLOSED) {
          throw err;
        }
        if (attempt % 10 === 0) {
          const message = err instanceof Error ? err.message : String(err);
          this.#settings.logger.warn(`walcast: cannot connect to NATS (${message}); retrying`);
        }
        await this.#pause(backoff(attempt, this.#settings.maxBackoff));
      }
    }
  }

  /** Interrupts the readers whenever the connection is re-established. */
  #watchReconnects(nc: NatsConnection): void {
    const iterator = nc.status()[Symbol.asyncIterator]();
    this.#stopWatching = () => {
      (iterator as { stop?: () => void }).stop?.();
      void iterator.return?.();
    };
    void (async () => {
      for (;;) {
        const next = await iterator.next();
        if (next.done || this.#closing) {
          return;
        }
        if (next.value.type === "reconnect") {
          this.#settings.logger.info("walcast: NATS reconnected; resuming the stream after the last message seen");
          for (const reader of this.#readers) {
            reader.interrupt();
          }
        }
      }
    })().catch(() => {});
  }

  #checkConnection(): void {
    if (this.#nc?.isClosed()) {
      throw new WalcastError("connection_closed", "the NATS connection was closed");
    }
  }

  // --- catch-up and readers, with retries ----------------------------------

  /** One catch-up answer; retries transient failures until closed. */
  async #catchup(tenant: string, afterSeq: bigint): Promise<CatchupAnswer> {
    const subject = catchupSubject(this.#settings.subjectPrefix, tenant);
    for (let attempt = 0; ; attempt++) {
      try {
        const nc = this.#nc as NatsConnection;
        return await this.#guard(requestCatchup(nc, subject, tenant, afterSeq, this.#settings.requestTimeout));
      } catch (err) {
        if (!(err instanceof TransientCatchupFailure)) {
          throw err;
        }
        this.#checkConnection();
        if (attempt % 10 === 0) {
          this.#settings.logger.warn(`walcast: ${err.message}; retrying (attempt ${attempt + 1})`);
        }
        await this.#pause(backoff(attempt, this.#settings.maxBackoff));
      }
    }
  }

  /** Opens a reader; retries (stream missing, NATS down) until closed. */
  async #open(stream: string, filter: string, from: ReadFrom): Promise<Reader> {
    const js = this.#js as JetStreamClient;
    for (let attempt = 0; ; attempt++) {
      try {
        const reader = await this.#guard(
          Reader.open(js, this.#oversized as OversizedEvents, stream, filter, from, this.#settings.logger),
        );
        if (this.#closing) {
          reader.stop();
          throw CLOSED;
        }
        this.#readers.add(reader);
        this.stats.consumers++;
        return reader;
      } catch (err) {
        if (err === CLOSED) {
          throw err;
        }
        this.#checkConnection();
        if (attempt % 10 === 0) {
          const message = err instanceof Error ? err.message : String(err);
          this.#settings.logger.warn(`walcast: cannot read stream ${stream} (${filter}): ${message}; retrying`);
        }
        await this.#pause(backoff(attempt, this.#settings.maxBackoff));
      }
    }
  }

  #close(reader: Reader): void {
    reader.stop();
    this.#readers.delete(reader);
  }

  // --- the flow ---------------------------------------------------------------

  async *#main(): AsyncGenerator<LoadItem, void, undefined> {
    const tenant = this.#settings.tenant;
    let start: Start;
    if (tenant === undefined) {
      start = yield* this.#planAll();
    } else {
      const afterSeq = this.#settings.state === undefined ? this.#settings.afterSeq : yield* this.#loadState(tenant);
      start = yield* this.#planTenant(tenant, afterSeq);
    }
    for (;;) {
      const reader = await this.#open(start.stream, start.filter, start.from);
      try {
        if (reader.numPending === 0) {
          yield* this.#goLive();
        }
        for await (const message of reader) {
          start = { ...start, from: message.streamSeq + 1 };
          yield* this.#handle(message);
          if (message.pending === 0) {
            yield* this.#goLive();
          }
        }
      } catch (err) {
        if (err === CLOSED || this.#closing || err instanceof WalcastError) {
          throw err;
        }
        const message = err instanceof Error ? err.message : String(err);
        this.#settings.logger.warn(`walcast: stream consumer failed: ${message}; reopening`);
      } finally {
        this.#close(reader);
      }
      if (this.#closing) {
        throw CLOSED;
      }
      this.#checkConnection();
      if (reader.interrupted) {
        continue; // reconnected: go on right after the last message
      }
      // The ordered consumer gave up (it survives plain reconnects). For one
      // tenant, ask the catch-up service where to go on: the stream may have
      // been recreated. For all tenants, go on after the last message.
      await this.#pause(backoff(0, this.#settings.maxBackoff));
      if (tenant !== undefined) {
        start = yield* this.#planTenant(tenant, this.#positions.position(tenant) ?? 0n);
      }
    }
  }

  /**
   * `loadAndFollow()`: yields the tenant's snapshot from the state bucket
   * (see `state.ts`) and returns its `asOfSeq`, where the events go on.
   * Transient failures are retried; the readiness wait has its deadline.
   */
  async *#loadState(tenant: string): AsyncGenerator<SnapshotItem, bigint, undefined> {
    const state = this.#settings.state as NonNullable<Settings["state"]>;
    const ctx: StateContext = {
      nc: this.#nc as NatsConnection,
      js: this.#js as JetStreamClient,
      jsm: await jetstreamManager(this.#nc as NatsConnection, { checkAPI: false }),
      oversized: this.#oversized as OversizedEvents,
      bucket: state.bucket,
      signal: this.#abort.signal,
      logger: this.#settings.logger,
    };
    const deadline = Date.now() + state.readyTimeout;
    for (let attempt = 0; ; attempt++) {
      try {
        const revision = await this.#guard(waitUntilComplete(ctx, tenant, deadline));
        const loaded = await this.#guard(readConsistent(ctx, tenant, revision));
        this.#positions.skipTo(tenant, loaded.asOfSeq);
        const asOfSeq = loaded.asOfSeq;
        yield { type: "snapshot", tenantId: tenant, asOfSeq, as_of_seq: asOfSeq, rows: loaded.rows };
        return loaded.asOfSeq;
      } catch (err) {
        if (err === CLOSED || err instanceof WalcastError) {
          throw err;
        }
        this.#checkConnection();
        const message = err instanceof Error ? err.message : String(err);
        this.#settings.logger.warn(`walcast: loading ${tenant} from ${state.bucket}: ${message}; retrying`);
        await this.#pause(backoff(attempt, this.#settings.maxBackoff));
      }
    }
  }

  /** Start of a one-tenant subscription; may yield `resync`. */
  async *#planTenant(tenant: string, afterSeq: bigint | "latest"): AsyncGenerator<SubscriptionItem, Start, undefined> {
    let position: bigint;
    if (afterSeq === "latest") {
      // The tenant's last seq comes with any successful answer.
      let answer = await this.#catchup(tenant, 0n);
      while (answer.kind === "too_old") {
        answer = await this.#catchup(tenant, answer.oldestSeq - 1n);
      }
      position = answer.lastSeq;
      this.#positions.skipTo(tenant, position);
      if (answer.lastSeq === 0n) {
        return { stream: answer.stream, filter: answer.filterSubject, from: answer.startStreamSeq };
      }
    } else {
      position = afterSeq;
    }
    const plan = yield* this.#planFrom(tenant, position);
    return { stream: plan.stream, filter: plan.filterSubject, from: plan.startStreamSeq };
  }

  /** A plan for `tenant` after `position`, turning `too_old` into `resync`. */
  async *#planFrom(tenant: string, position: bigint): AsyncGenerator<SubscriptionItem, CatchupPlan, undefined> {
    let after = position;
    for (let contradictions = 0; ; ) {
      const answer = await this.#catchup(tenant, after);
      if (answer.kind === "plan") {
        return answer;
      }
      if (answer.oldestSeq <= after + 1n) {
        // "too old" while older events are still there: the event after
        // `after` is missing from the middle of the stream (or expired
        // between two probes of the service: ask again, a little later).
        if (++contradictions < 3) {
          await this.#pause(backoff(contradictions, this.#settings.maxBackoff));
          continue;
        }
        throw new GapError(
          tenant,
          after + 1n,
          undefined,
          `the catch-up service reports it too old while the stream still holds seq ${answer.oldestSeq}: events are missing from the stream`,
        );
      }
      yield* this.#resync(tenant, after, answer.oldestSeq);
      after = answer.oldestSeq - 1n;
    }
  }

  /** Start of an all-tenants subscription; may yield `resync`s. */
  async *#planAll(): AsyncGenerator<SubscriptionItem, Start, undefined> {
    const { stream, subjectPrefix, positions, afterSeq } = this.#settings;
    // <prefix>.<tenant>.<entity>.<action>: four tokens after the prefix's,
    // so `<prefix>._deadletter` and `<prefix>._truncated` never match.
    const filter = `${subjectPrefix}.*.*.*`;
    if (afterSeq === "latest") {
      return { stream, filter, from: "new" };
    }
    if (positions.size === 0) {
      return { stream, filter, from: "first" };
    }
    let pending = [...positions.entries()];
    let from = Number.POSITIVE_INFINITY;
    let planStream = stream;
    while (pending.length > 0) {
      const answers = await pool(pending, 16, ([tenant, after]) => this.#catchup(tenant, after));
      const again: [string, bigint][] = [];
      for (const [index, answer] of answers.entries()) {
        const [tenant, after] = pending[index] as [string, bigint];
        if (answer.kind === "plan") {
          from = Math.min(from, answer.startStreamSeq);
          planStream = answer.stream;
        } else {
          yield* this.#resync(tenant, after, answer.oldestSeq);
          again.push([tenant, answer.oldestSeq - 1n]);
        }
      }
      pending = again;
    }
    return { stream: planStream, filter, from };
  }

  /** Judges one event from the main reader. */
  async *#handle(message: StreamEvent): AsyncGenerator<SubscriptionItem, void, undefined> {
    const event = message.event;
    if (event.seq === 0n || event.tenantId === "") {
      // Not a tenant event (dead letter); the filter should have kept it out.
      return;
    }
    let verdict = this.#positions.judge(event);
    if (verdict.kind === "gap") {
      yield* this.#repair(event.tenantId, verdict.after, event.seq);
      verdict = this.#positions.judge(event);
      if (verdict.kind === "gap") {
        throw new GapError(event.tenantId, verdict.after + 1n, event.seq, "the repair did not reach it");
      }
    }
    if (verdict.kind === "duplicate") {
      this.stats.duplicates++;
      return;
    }
    yield* this.#deliver(message);
  }

  async *#deliver(message: StreamEvent): AsyncGenerator<SubscriptionItem, void, undefined> {
    this.#positions.accept(message.event);
    this.stats.delivered++;
    yield { type: "event", event: message.event, subject: message.subject, streamSeq: message.streamSeq };
  }

  async *#resync(tenant: string, afterSeq: bigint, oldestSeq: bigint): AsyncGenerator<SubscriptionItem, void, undefined> {
    this.stats.resyncs++;
    this.#positions.skipTo(tenant, oldestSeq - 1n);
    this.#settings.logger.warn(
      `walcast: tenant ${tenant}: events ${afterSeq + 1n}..${oldestSeq - 1n} are no longer in the stream; re-sync needed`,
    );
    yield { type: "resync", reason: "too_old", tenantId: tenant, afterSeq, oldestSeq };
  }

  async *#goLive(): AsyncGenerator<SubscriptionItem, void, undefined> {
    if (this.#live) {
      return;
    }
    this.#live = true;
    const tenant = this.#settings.tenant;
    yield { type: "live", seq: tenant === undefined ? undefined : (this.#positions.position(tenant) ?? 0n) };
  }

  /**
   * Delivers `tenant`'s events after `after` up to `before - 1`, read from
   * where the catch-up service says they are. Throws `GapError` when they
   * are not there.
   */
  async *#repair(tenant: string, after: bigint, before: bigint): AsyncGenerator<SubscriptionItem, void, undefined> {
    this.stats.gapsRepaired++;
    this.#settings.logger.warn(
      `walcast: tenant ${tenant}: seq jumped from ${after} to ${before}; repairing through the catch-up service`,
    );
    const target = before - 1n;
    while ((this.#positions.position(tenant) ?? 0n) < target) {
      const plan = yield* this.#planFrom(tenant, this.#positions.position(tenant) ?? 0n);
      if ((this.#positions.position(tenant) ?? 0n) >= target) {
        break; // too_old skipped past the hole
      }
      const reader = await this.#open(plan.stream, plan.filterSubject, plan.startStreamSeq);
      let timedOut = false;
      const arm = (): ReturnType<typeof setTimeout> =>
        setTimeout(() => {
          timedOut = true;
          reader.stop();
        }, this.#settings.repairTimeout);
      let timer = arm();
      try {
        for await (const message of reader) {
          clearTimeout(timer);
          timer = arm();
          const verdict = this.#positions.judge(message.event);
          if (verdict.kind === "gap") {
            throw new GapError(
              tenant,
              verdict.after + 1n,
              message.event.seq,
              "the catch-up service pointed at a stream range that lacks these events",
            );
          }
          if (verdict.kind === "duplicate") {
            this.stats.duplicates++;
            continue;
          }
          yield* this.#deliver(message);
          if (message.event.seq >= target) {
            break;
          }
        }
      } finally {
        clearTimeout(timer);
        this.#close(reader);
      }
      if (this.#closing) {
        throw CLOSED;
      }
      this.#checkConnection();
      if (reader.interrupted && !timedOut) {
        continue; // reconnected mid-repair: ask again from where we are
      }
      if ((this.#positions.position(tenant) ?? 0n) < target) {
        const position = this.#positions.position(tenant) ?? 0n;
        throw new GapError(
          tenant,
          position + 1n,
          before,
          timedOut
            ? `the missing events did not arrive within ${this.#settings.repairTimeout} ms`
            : "the repair stream ended early",
        );
      }
    }
  }
}
