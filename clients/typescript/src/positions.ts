/**
 * Where each tenant stands: the pure core of dedup and gap detection.
 *
 * Invariant: an event is delivered only when its `seq` is exactly the
 * tenant's position + 1 and its `event_id` was not delivered before; the
 * position then becomes its `seq`. So what the application sees per tenant is
 * 1, 2, 3, ... with no repeats and no holes, whatever the transport does.
 *
 * No I/O here, so every rule is unit-tested directly.
 *
 * @module
 */

/** The identity of an event, as far as ordering is concerned. */
export interface Sequenced {
  readonly tenantId: string;
  readonly seq: bigint;
  readonly eventId: string;
}

/** What to do with an incoming event. */
export type Verdict =
  /** The next one: deliver it, then {@link Positions.accept} it. */
  | { readonly kind: "deliver" }
  /** Seen before (same `event_id`, or `seq` at or below the position): drop it. */
  | { readonly kind: "duplicate"; readonly by: "event_id" | "seq" }
  /** Events are missing before it: repair `(after, event.seq)` first. */
  | { readonly kind: "gap"; readonly after: bigint };

/**
 * Per-tenant positions plus a bounded memory of recent event ids.
 *
 * A tenant without a position is either at `initial` (e.g. `0n`: its first
 * event must be `seq` 1) or, when `initial` is `undefined`, takes its first
 * event as the baseline (an all-tenants subscription started at "latest").
 */
export class Positions {
  readonly #positions = new Map<string, bigint>();
  readonly #recentIds = new Set<string>();
  readonly #window: number;
  readonly #initial: bigint | undefined;

  constructor(window: number, initial: bigint | undefined, known?: ReadonlyMap<string, bigint>) {
    this.#window = window;
    this.#initial = initial;
    for (const [tenant, seq] of known ?? []) {
      this.#positions.set(tenant, seq);
    }
  }

  /** The last `seq` delivered for `tenant` (or its starting point). */
  position(tenant: string): bigint | undefined {
    return this.#positions.get(tenant) ?? this.#initial;
  }

  /** Judges `event` without changing anything. */
  judge(event: Sequenced): Verdict {
    if (this.#recentIds.has(event.eventId)) {
      return { kind: "duplicate", by: "event_id" };
    }
    const position = this.position(event.tenantId);
    if (position === undefined || event.seq === position + 1n) {
      return { kind: "deliver" };
    }
    if (event.seq <= position) {
      return { kind: "duplicate", by: "seq" };
    }
    return { kind: "gap", after: position };
  }

  /** Records that `event` was delivered. */
  accept(event: Sequenced): void {
    this.#positions.set(event.tenantId, event.seq);
    this.#recentIds.add(event.eventId);
    if (this.#recentIds.size > this.#window) {
      // Sets iterate in insertion order: drop the oldest id.
      const oldest = this.#recentIds.values().next();
      if (!oldest.done) {
        this.#recentIds.delete(oldest.value);
      }
    }
  }

  /**
   * Moves `tenant` forward to `seq` without delivering anything: after a
   * `too_old` re-sync the events up to `seq` are gone for good.
   */
  skipTo(tenant: string, seq: bigint): void {
    const position = this.position(tenant);
    if (position === undefined || seq > position) {
      this.#positions.set(tenant, seq);
    }
  }
}
