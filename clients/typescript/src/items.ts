/**
 * What a subscription yields: events, plus two control items modelled on
 * Electric's `must-refetch` / `up-to-date` messages.
 *
 * @module
 */

import type { ChangeEvent } from "./gen/walcast/v1/events_pb.js";

/** One change, in `seq` order for its tenant, never twice. */
export interface EventItem {
  readonly type: "event";
  /** The decoded event (the full one, also for oversized events). */
  readonly event: ChangeEvent;
  /** The NATS subject it was published on, e.g. `walcast.acme.task.completed`. */
  readonly subject: string;
  /** Its JetStream stream sequence (for logs; resume by `event.seq`). */
  readonly streamSeq: number;
}

/**
 * Re-sync signal: the stream no longer holds events the application has not
 * seen (`seq` in `afterSeq + 1 .. oldestSeq - 1`; they aged out of the
 * stream). The application must rebuild its state for `tenantId` from the
 * database. The subscription then goes on with `seq = oldestSeq`, the oldest
 * event still held, so nothing still available is skipped.
 */
export interface ResyncItem {
  readonly type: "resync";
  readonly reason: "too_old";
  readonly tenantId: string;
  /** The position the subscription had. */
  readonly afterSeq: bigint;
  /** The oldest `seq` the stream still holds for this tenant. */
  readonly oldestSeq: bigint;
}

/**
 * Caught up: everything published before the subscription started has been
 * delivered; from here on events arrive as they are published. Sent once.
 */
export interface LiveItem {
  readonly type: "live";
  /**
   * One-tenant subscriptions: the tenant's position (last `seq` delivered,
   * or the starting point). All-tenants subscriptions: `undefined`.
   */
  readonly seq: bigint | undefined;
}

/** Anything a subscription yields; switch on `type`. */
export type SubscriptionItem = EventItem | ResyncItem | LiveItem;

/**
 * `loadAndFollow()`'s first item: the tenant's current rows, read from
 * walcast's state bucket, consistent with the stream at `asOfSeq`. The
 * events that follow start at `seq = asOfSeq + 1`; applying them to `rows`
 * gives the tenant's rows at every point.
 */
export interface SnapshotItem {
  readonly type: "snapshot";
  readonly tenantId: string;
  /**
   * The tenant's last event these rows reflect (0 when none does: an empty
   * tenant, or only rows copied by walcast's backfill).
   */
  readonly asOfSeq: bigint;
  /** `asOfSeq` under SPEC §8's (and the Rust client's) name. */
  readonly as_of_seq: bigint;
  /**
   * Every current row, keyed by its state key (`<tenant>.task.<id>`,
   * `<tenant>.project.<id>`, `<tenant>.lock.<record_type>.<record_id>`). Each
   * value is the row's latest `ChangeEvent`; its `after` is the row
   * (oversized rows arrive complete). Rows copied by the backfill and
   * unchanged since have `seq` 0 and the entity's create action.
   */
  readonly rows: ReadonlyMap<string, ChangeEvent>;
}

/** What `loadAndFollow()` yields: one snapshot first, then subscription items. */
export type LoadItem = SnapshotItem | SubscriptionItem;

/** Counters of one subscription (read `subscription.stats`). */
export interface SubscriptionStats {
  /** Events delivered. */
  delivered: number;
  /** Duplicates dropped (same `event_id`, or `seq` already delivered). */
  duplicates: number;
  /** `seq` jumps repaired through the catch-up service. */
  gapsRepaired: number;
  /** Re-sync signals (`too_old`) sent. */
  resyncs: number;
  /** Stream consumers (re)created, including the first. */
  consumers: number;
}
