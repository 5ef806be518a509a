/**
 * Reads a pull consumer to its end through a plain subscription and pull
 * requests of its own, for the state read's many small messages.
 *
 * Why: nats.js' `consume()` wraps every message (a `JsMsg`, an async
 * iterator's queue, per-message bookkeeping and heartbeat checks). A
 * subscription callback with pull requests refilled at half a batch
 * receives the same 10,000 keys in p50 35–40 ms against 53–57 ms through
 * `consume()` (docs/BENCHMARKS.md, session 24). It
 * needs no permission `consume()` does not: publish to
 * `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` and subscribe to one's
 * own inbox (SPEC §9).
 *
 * The read ends at the message whose delivery info says nothing is
 * pending. The server counts a write into the pending a moment after
 * acknowledging it (its stream signals consumers through a queue), so a
 * read may end before the last writes made during it: what it delivered is
 * always a prefix of the consumer, never a guaranteed "up to now". Nothing goes missing unnoticed: a consumer without acks delivers
 * each message once, numbered 1, 2, … (the consumer sequence), so the
 * consumer sequence of a message must equal the count received. Any other
 * status than a heartbeat, a reconnect (pull requests die with the old
 * connection), silence for `stallMs`, or an abort ends the read with
 * {@link PullBroken}: the caller starts over.
 *
 * No Node-only APIs here: this runs in browsers too.
 *
 * @module
 */

import type { Msg, NatsConnection } from "@nats-io/nats-core";
import { createInbox } from "@nats-io/nats-core";

import { hasReply, replyText } from "./rawmsg.js";

/** The read broke (lost messages, a reconnect, silence, a status): read again. */
export class PullBroken extends Error {
  override readonly name = "PullBroken";
}

/** What to read and where each message goes. */
export interface PullRead {
  readonly nc: NatsConnection;
  readonly stream: string;
  readonly consumer: string;
  /** The consumer's pending count when it was created. */
  readonly numPending: number;
  /** Messages per pull request; the next is sent when half are in. */
  readonly batch: number;
  readonly stallMs: number;
  readonly signal: AbortSignal;
  /** Takes each message, in order. What it throws ends the read as is. */
  readonly onMessage: (msg: Msg) => void;
}

/** A message's place in the consumer: its consumer sequence and what is pending after it. */
interface Delivery {
  readonly consumerSeq: number;
  readonly pending: number;
}

/**
 * The consumer sequence and pending count from a JetStream reply subject:
 * `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ms>.<pending>`,
 * or with `<domain>.<account hash>` after `ACK` and a random token at the end.
 */
export function parseDelivery(reply: string): Delivery | undefined {
  const tokens = reply.split(".");
  const at = tokens.length === 9 ? 6 : tokens.length === 11 || tokens.length === 12 ? 8 : -1;
  if (at < 0 || tokens[0] !== "$JS" || tokens[1] !== "ACK") {
    return undefined;
  }
  const consumerSeq = Number(tokens[at]);
  const pending = Number(tokens[at + 2]);
  return Number.isSafeInteger(consumerSeq) && Number.isSafeInteger(pending) ? { consumerSeq, pending } : undefined;
}

/** Reads the consumer until nothing is pending. */
export function pullAll(read: PullRead): Promise<void> {
  if (read.numPending === 0) {
    return Promise.resolve();
  }
  return new Promise<void>((resolve, reject) => {
    const inboxPrefix = (read.nc as unknown as { options?: { inboxPrefix?: string } }).options?.inboxPrefix;
    const inbox = createInbox(inboxPrefix);
    const next = `$JS.API.CONSUMER.MSG.NEXT.${read.stream}.${read.consumer}`;
    const request = new TextEncoder().encode(JSON.stringify({ batch: read.batch }));
    let received = 0;
    let requested = 0;
    // A message's `pending` is what is left after it; writes meanwhile only
    // add to it. So the next message that can be the last is `pending`
    // messages on, and its delivery info is read only there.
    let lastAt = 1;
    let settled = false;

    const finish = (err?: unknown): void => {
      if (settled) {
        return;
      }
      settled = true;
      clearInterval(stallTimer);
      read.signal.removeEventListener("abort", onAbort);
      (statuses as { stop?: () => void }).stop?.();
      sub.unsubscribe();
      if (err === undefined) {
        resolve();
      } else {
        reject(err);
      }
    };
    const ask = (): void => {
      read.nc.publish(next, request, { reply: inbox });
      requested += read.batch;
    };

    const sub = read.nc.subscribe(inbox, {
      callback: (err, msg) => {
        if (settled) {
          return;
        }
        if (err !== null) {
          finish(new PullBroken(`pulling from ${read.stream}: ${err.message}`));
          return;
        }
        if (!hasReply(msg)) {
          const code = msg.headers?.code ?? 0;
          if (code !== 100) {
            finish(new PullBroken(`pulling from ${read.stream}: ${code} ${msg.headers?.description ?? ""}`.trim()));
          }
          return;
        }
        received++;
        try {
          read.onMessage(msg);
        } catch (e) {
          finish(e);
          return;
        }
        if (received === lastAt) {
          const delivery = parseDelivery(replyText(msg));
          if (delivery === undefined || delivery.consumerSeq !== received) {
            finish(new PullBroken(`pulling from ${read.stream}: a message went missing`));
            return;
          }
          if (delivery.pending === 0) {
            finish();
            return;
          }
          lastAt = received + delivery.pending;
        }
        if (requested - received <= read.batch / 2) {
          ask();
        }
      },
    });

    const statuses = read.nc.status();
    void (async () => {
      for await (const status of statuses) {
        if (status.type === "reconnect" || status.type === "disconnect" || status.type === "close") {
          finish(new PullBroken(`pulling from ${read.stream}: the connection was interrupted`));
        }
      }
    })().catch(() => {});

    let seen = 0;
    let quietSince = Date.now();
    const stallTimer = setInterval(() => {
      if (received !== seen) {
        seen = received;
        quietSince = Date.now();
      } else if (Date.now() - quietSince >= read.stallMs) {
        finish(new PullBroken(`pulling from ${read.stream}: nothing for ${read.stallMs} ms`));
      }
    }, Math.min(1_000, read.stallMs));
    const onAbort = (): void => finish(new PullBroken("closed"));
    read.signal.addEventListener("abort", onAbort, { once: true });
    if (read.signal.aborted) {
      onAbort();
      return;
    }
    ask();
  });
}
