/**
 * The public entry point: `subscribe()` and the `Subscription` it returns,
 * consumed either as an async iterator or through callbacks.
 *
 * A subscription is lazy in iterator mode (nothing connects until the first
 * `next()`) and starts at once in callback mode. Either way `close()` stops
 * it, waits until it has stopped, and never throws; `closed()` tells how it
 * ended.
 *
 * @module
 */

import { WalcastError } from "./errors.js";
import type { ChangeEvent } from "./gen/walcast/v1/events_pb.js";
import type {
  EventItem,
  LiveItem,
  LoadItem,
  ResyncItem,
  SnapshotItem,
  SubscriptionItem,
  SubscriptionStats,
} from "./items.js";
import type { LoadOptions, SubscribeOptions } from "./options.js";
import { resolveLoadOptions, resolveOptions } from "./options.js";
import { Pump } from "./pump.js";

/**
 * Callbacks for {@link subscribe}. Each may return a promise: the next item
 * is delivered only after it settles (so a slow handler slows the
 * subscription down instead of piling events up). A handler that throws ends
 * the subscription with a `WalcastError` of code `handler`.
 */
export interface SubscriptionHandlers {
  /** Every event, in `seq` order per tenant, never twice. */
  onEvent(event: ChangeEvent, item: EventItem): void | Promise<void>;
  /** Events aged out of the stream: rebuild the tenant's state (see {@link ResyncItem}). */
  onResync?(item: ResyncItem): void | Promise<void>;
  /** Caught up with the stream (once). */
  onLive?(item: LiveItem): void | Promise<void>;
  /** The subscription ended with an error (never called after `close()`). */
  onError(error: WalcastError): void;
}

/** Callbacks for {@link loadAndFollow}: those of {@link subscribe}, plus the snapshot. */
export interface LoadHandlers extends SubscriptionHandlers {
  /** The tenant's rows, first and once; the events that follow apply to them. */
  onSnapshot(item: SnapshotItem): void | Promise<void>;
}

/**
 * A running subscription. Create it with {@link subscribe} (items:
 * `SubscriptionItem`) or {@link loadAndFollow} (items: `LoadItem`).
 */
export interface Subscription<Item extends LoadItem = SubscriptionItem> extends AsyncIterable<Item> {
  /** Counters since the start. */
  readonly stats: Readonly<SubscriptionStats>;
  /**
   * Stops the subscription and resolves once it has stopped (and closed the
   * NATS connection, if it opened it). Idempotent; never rejects.
   */
  close(): Promise<void>;
  /**
   * Resolves when the subscription has ended: with `undefined` after
   * `close()` (or the end of iteration), with the error that ended it
   * otherwise.
   */
  closed(): Promise<WalcastError | undefined>;
}

class SubscriptionImpl<Item extends LoadItem> implements Subscription<Item> {
  readonly #pump: Pump;
  readonly #generator: AsyncGenerator<Item, void, undefined>;
  readonly #ended: Promise<WalcastError | undefined>;
  #end!: (error: WalcastError | undefined) => void;
  #taken = false;
  #closing: Promise<void> | undefined;
  #failure: WalcastError | undefined;

  constructor(pump: Pump) {
    this.#pump = pump;
    // The pump yields a snapshot only in load mode, which only loadAndFollow() sets.
    this.#generator = pump.run() as AsyncGenerator<Item, void, undefined>;
    this.#ended = new Promise((resolve) => {
      this.#end = resolve;
    });
  }

  get stats(): Readonly<SubscriptionStats> {
    return { ...this.#pump.stats };
  }

  closed(): Promise<WalcastError | undefined> {
    return this.#ended;
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#pump.abort();
      try {
        await this.#generator.return(undefined);
      } catch {
        // The error, if any, was already reported through next().
      }
      this.#end(this.#failure);
    })();
    return this.#closing;
  }

  /** Pulls the next item, recording how the subscription ended. */
  async next(): Promise<IteratorResult<Item, undefined>> {
    try {
      const result = await this.#generator.next();
      if (result.done) {
        this.#end(undefined);
        return { done: true, value: undefined };
      }
      return result;
    } catch (err) {
      const error = err instanceof WalcastError ? err : new WalcastError("unexpected", String(err), { cause: err });
      this.#end(error);
      throw error;
    }
  }

  /** Records `error` as the reason the subscription ends (call before `close()`). */
  fail(error: WalcastError): void {
    this.#failure ??= error;
  }

  /** Takes the single iterator (iterator mode) or marks callback mode. */
  take(): void {
    if (this.#taken) {
      throw new WalcastError(
        "invalid_options",
        "a subscription can be consumed once: iterate it once, or pass handlers, not both",
      );
    }
    this.#taken = true;
  }

  [Symbol.asyncIterator](): AsyncIterator<Item, undefined> {
    this.take();
    return {
      next: () => this.next(),
      return: async () => {
        await this.close();
        return { done: true, value: undefined };
      },
    };
  }
}

/** Runs a subscription in callback mode. */
async function dispatch(
  subscription: SubscriptionImpl<LoadItem>,
  handlers: SubscriptionHandlers & Partial<LoadHandlers>,
): Promise<void> {
  for (;;) {
    let result: IteratorResult<LoadItem, undefined>;
    try {
      result = await subscription.next();
    } catch (err) {
      handlers.onError(err as WalcastError);
      return;
    }
    if (result.done) {
      return;
    }
    const item = result.value;
    try {
      switch (item.type) {
        case "event":
          await handlers.onEvent(item.event, item);
          break;
        case "resync":
          await handlers.onResync?.(item);
          break;
        case "live":
          await handlers.onLive?.(item);
          break;
        case "snapshot":
          await handlers.onSnapshot?.(item);
          break;
      }
    } catch (err) {
      const error = new WalcastError(
        "handler",
        `a subscription handler threw: ${err instanceof Error ? err.message : String(err)}`,
        { cause: err },
      );
      subscription.fail(error);
      const closing = subscription.close();
      handlers.onError(error);
      await closing;
      return;
    }
  }
}

/**
 * Subscribes to one tenant's events (or every tenant's) after a `seq`.
 *
 * Iterator mode — lazy, single consumer, `break` closes it:
 * ```ts
 * const sub = subscribe({ servers: "nats://127.0.0.1:4222", tenant: "acme", afterSeq: 41n });
 * for await (const item of sub) {
 *   if (item.type === "event") apply(item.event);
 *   else if (item.type === "resync") await reloadFromDatabase(item.tenantId);
 * }
 * ```
 * Callback mode — starts at once:
 * ```ts
 * const sub = subscribe({ tenant: "acme" }, { onEvent: apply, onError: console.error });
 * await sub.close();
 * ```
 *
 * @throws {WalcastError} `invalid_options` at once for invalid options.
 */
export function subscribe(options: SubscribeOptions): Subscription;
export function subscribe(options: SubscribeOptions, handlers: SubscriptionHandlers): Subscription;
export function subscribe(options: SubscribeOptions, handlers?: SubscriptionHandlers): Subscription {
  return start<SubscriptionItem>(new Pump(resolveOptions(options)), handlers, []);
}

/**
 * Loads a tenant's current rows, then follows its events (SPEC §8): first one
 * `snapshot` item (every row, typed, and the `asOfSeq` it reflects), then
 * exactly what {@link subscribe} would yield with `afterSeq = asOfSeq`:
 * the tenant's events in `seq` order, each once, with gap repair, `resync`
 * and `live`. Applying the events to the snapshot gives the tenant's rows at
 * every point, whatever is committed during the load.
 *
 * Reads walcast's state bucket and stream, never Postgres. Waits up to
 * `stateReadyTimeout` while walcast is still copying the tables, then ends
 * with a `StateNotReadyError`. Works in browsers with a `connection` from
 * `wsconnect()` (`@nats-io/nats-core`).
 *
 * ```ts
 * for await (const item of loadAndFollow({ servers, tenant: "acme" })) {
 *   if (item.type === "snapshot") rows = new Map(item.rows);
 *   else if (item.type === "event") apply(rows, item.event);
 * }
 * ```
 *
 * @throws {WalcastError} `invalid_options` at once for invalid options.
 */
export function loadAndFollow(options: LoadOptions): Subscription<LoadItem>;
export function loadAndFollow(options: LoadOptions, handlers: LoadHandlers): Subscription<LoadItem>;
export function loadAndFollow(options: LoadOptions, handlers?: LoadHandlers): Subscription<LoadItem> {
  return start<LoadItem>(new Pump(resolveLoadOptions(options)), handlers, ["onSnapshot"]);
}

/** A subscription over `pump`, in callback mode when `handlers` are given. */
function start<Item extends LoadItem>(
  pump: Pump,
  handlers: SubscriptionHandlers | undefined,
  alsoRequired: readonly (keyof LoadHandlers)[],
): Subscription<Item> {
  const subscription = new SubscriptionImpl<Item>(pump);
  if (handlers !== undefined) {
    const required = ["onEvent", "onError", ...alsoRequired] as const;
    const record = handlers as unknown as Record<string, unknown>;
    if (required.some((name) => typeof record[name] !== "function")) {
      throw new WalcastError("invalid_options", `handlers need at least ${required.join(", ")}`);
    }
    subscription.take();
    void dispatch(subscription as unknown as SubscriptionImpl<LoadItem>, handlers);
  }
  return subscription;
}
