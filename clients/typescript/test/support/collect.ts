/** Drains a subscription in the background so tests can wait on what arrived. */

import type { Subscription, SubscriptionItem } from "../../src/index.js";
import { WalcastError } from "../../src/index.js";
import { waitFor } from "./env.js";

export class Collector {
  readonly items: SubscriptionItem[] = [];
  error: WalcastError | undefined;
  done = false;
  readonly finished: Promise<void>;

  constructor(readonly subscription: Subscription) {
    this.finished = (async () => {
      try {
        for await (const item of subscription) {
          this.items.push(item);
        }
      } catch (err) {
        this.error = err instanceof WalcastError ? err : new WalcastError("unexpected", String(err));
      } finally {
        this.done = true;
      }
    })();
  }

  /** `tenant:seq` of every event so far. */
  get events(): string[] {
    return this.items.flatMap((i) => (i.type === "event" ? [`${i.event.tenantId}:${i.event.seq}`] : []));
  }

  /** Compact log of every item: `A:1`, `resync(A 0→3)`, `live(2)`. */
  get log(): string[] {
    return this.items.map((i) => {
      switch (i.type) {
        case "event":
          return `${i.event.tenantId}:${i.event.seq}`;
        case "resync":
          return `resync(${i.tenantId} ${i.afterSeq}→${i.oldestSeq})`;
        case "live":
          return `live(${i.seq ?? "*"})`;
      }
    });
  }

  async untilEvents(count: number, timeoutMs = 10_000): Promise<void> {
    await waitFor(
      `${count} events (have ${this.events.length}: ${this.log.join(" ")}; error: ${this.error?.message ?? "none"})`,
      () => this.events.length >= count || this.done,
      timeoutMs,
    );
    if (this.events.length < count) {
      throw new Error(`subscription ended after ${this.log.join(" ")}: ${this.error?.message ?? "no error"}`);
    }
  }

  async until(what: string, condition: () => boolean, timeoutMs = 10_000): Promise<void> {
    await waitFor(`${what} (have ${this.log.join(" ")}; error: ${this.error?.message ?? "none"})`, condition, timeoutMs);
  }
}
