/**
 * Reading the stream: an ephemeral pull consumer on one filter subject from
 * one stream sequence, yielding decoded `ChangeEvent`s.
 *
 * The consumer ({@link filteredConsumer}) needs no acks and no stream info,
 * so a tenant user of walcast's auth callout may create it (SPEC §9). It
 * does not heal itself: when the server loses it (a restart) its messages
 * end with an error, and the pump reopens a reader after the last event it
 * delivered, as for any other trouble. What a reader cannot know is the
 * tenant `seq`: that check lives in `positions.ts`.
 *
 * Oversized events (SPEC §3): the message carries `Walcast-Object:
 * <bucket>/<event_id>` and a body without row images; the full event is read
 * from that JetStream object store bucket instead.
 *
 * @module
 */

import type { Consumer, ConsumerConfig, ConsumerMessages, JetStreamClient, JsMsg } from "@nats-io/jetstream";
import { AckPolicy, DeliverPolicy } from "@nats-io/jetstream";
import { nanos, nuid } from "@nats-io/nats-core";
import type { ObjectStore } from "@nats-io/obj";
import { Objm } from "@nats-io/obj";

import { WalcastError } from "./errors.js";
import type { ChangeEvent } from "./gen/walcast/v1/events_pb.js";
import { decodeChangeEvent } from "./decode.js";
import type { Logger } from "./options.js";

/** Where a reader starts: a stream sequence, the first message, or new ones only. */
export type ReadFrom = number | "first" | "new";

/** One decoded stream message. */
export interface StreamEvent {
  readonly event: ChangeEvent;
  readonly subject: string;
  readonly streamSeq: number;
  /** Messages left for this consumer after this one (0: caught up). */
  readonly pending: number;
}

/**
 * The object a `Walcast-Object` header names is gone: an event's expired
 * with the stream, or a state value's was replaced by the key's next value.
 */
export class ObjectMissingError extends WalcastError {
  constructor(message: string) {
    super("decode", message);
  }
}

/** Header naming the object that holds an oversized event. */
export const OBJECT_HEADER = "Walcast-Object";

/** How many messages a reader asks for at a time. */
const BATCH = 256;

/**
 * How often the server says a reader's pull still waits when there is
 * nothing to deliver. Two missed and the reader stops, for the pump to
 * reopen it: a consumer lost with the cluster node that held it (this
 * connection staying up on another node) otherwise went unnoticed for
 * good — nats.js only pulls again, from a consumer that is gone
 * (`test/unit/cluster.test.ts`).
 */
const HEARTBEAT_MS = 5_000;

/** The longest wait for an object's next chunk before the fetch fails (and is retried). */
const CHUNK_STALL_MS = 10_000;

/**
 * Fetches oversized events' full bodies; buckets are opened once.
 *
 * The chunks are read with an ordered pull consumer like every other read
 * here, not with `ObjectStore.get()`/`getBlob()`: those read through a push
 * consumer, and with several readers fetching while objects were being
 * written they were seen to hang for good — a subscription stuck in the
 * middle of a tenant, and `close()` stuck behind it.
 */
export class OversizedEvents {
  readonly #js: JetStreamClient;
  readonly #objm: Objm;
  readonly #buckets = new Map<string, Promise<ObjectStore>>();

  constructor(js: JetStreamClient) {
    this.#js = js;
    this.#objm = new Objm(js);
  }

  /** The full encoded event named by a `Walcast-Object` header value. */
  async fetch(reference: string): Promise<Uint8Array> {
    const slash = reference.indexOf("/");
    if (slash <= 0 || slash === reference.length - 1) {
      throw new WalcastError("decode", `malformed ${OBJECT_HEADER} header: ${JSON.stringify(reference)}`);
    }
    const bucket = reference.slice(0, slash);
    const name = reference.slice(slash + 1);
    const info = await (await this.#store(bucket)).info(name);
    if (info === null || info.deleted) {
      throw new ObjectMissingError(
        `oversized event ${name} is missing from object store bucket ${bucket} (expired or deleted)`,
      );
    }
    const data = await this.#chunks(bucket, info.nuid, info.size);
    if (data.length !== info.size) {
      throw new Error(`object ${reference}: read ${data.length} of ${info.size} bytes`);
    }
    return data;
  }

  #store(bucket: string): Promise<ObjectStore> {
    let store = this.#buckets.get(bucket);
    if (store === undefined) {
      store = this.#objm.open(bucket);
      this.#buckets.set(bucket, store);
      store.catch(() => this.#buckets.delete(bucket));
    }
    return store;
  }

  /** The object's chunks (`$O.<bucket>.C.<nuid>` in `OBJ_<bucket>`), concatenated. */
  async #chunks(bucket: string, nuid: string, size: number): Promise<Uint8Array> {
    const data = new Uint8Array(size);
    if (size === 0) {
      return data;
    }
    const consumer = await this.#js.consumers.get(`OBJ_${bucket}`, {
      filter_subjects: `$O.${bucket}.C.${nuid}`,
      deliver_policy: DeliverPolicy.All,
    });
    const messages = await consumer.consume({ max_messages: 64 });
    let timer = setTimeout(() => messages.stop(), CHUNK_STALL_MS);
    let offset = 0;
    try {
      for await (const msg of messages) {
        clearTimeout(timer);
        timer = setTimeout(() => messages.stop(), CHUNK_STALL_MS);
        data.set(msg.data.subarray(0, size - offset), offset);
        offset += msg.data.length;
        if (msg.info.pending === 0) {
          return data.subarray(0, Math.min(offset, size));
        }
      }
      throw new Error(`object chunks of ${bucket}/${nuid} stalled`);
    } finally {
      clearTimeout(timer);
      messages.stop();
      consumer.delete().catch(() => {});
    }
  }
}

/** Decodes one stream message, fetching an oversized body when needed. */
export async function decodeMessage(msg: JsMsg, oversized: OversizedEvents): Promise<StreamEvent> {
  const reference = msg.headers?.get(OBJECT_HEADER) ?? "";
  const bytes = reference === "" ? msg.data : await oversized.fetch(reference);
  let event: ChangeEvent;
  try {
    event = decodeChangeEvent(bytes);
  } catch (err) {
    throw new WalcastError(
      "decode",
      `stream message ${msg.info.streamSequence} on ${msg.subject} is not a walcast.v1.ChangeEvent`,
      { cause: err },
    );
  }
  return { event, subject: msg.subject, streamSeq: msg.info.streamSequence, pending: msg.info.pending };
}

/**
 * An ephemeral, unacknowledged pull consumer on `filter`, and how many
 * messages it had pending when created.
 *
 * Created with a random name on the API subject that carries the filter
 * (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) and bound from the
 * creation's answer: no `STREAM.INFO`, no `CONSUMER.INFO`. That is exactly
 * what walcast's auth callout lets a tenant user do (SPEC §9); nats.js'
 * ordered consumers read `STREAM.INFO` first, which it may not. Consume it
 * with `abort_on_missing_resource`, so a consumer the server lost ends the
 * iteration with an error instead of waiting forever.
 */
export async function filteredConsumer(
  js: JetStreamClient,
  stream: string,
  filter: string,
  start: Pick<ConsumerConfig, "deliver_policy" | "opt_start_seq">,
): Promise<{ consumer: Consumer; name: string; numPending: number }> {
  const jsm = await js.jetstreamManager(false);
  const info = await jsm.consumers.add(stream, {
    name: `wc_${nuid.next()}`,
    filter_subject: filter,
    ...start,
    ack_policy: AckPolicy.None,
    inactive_threshold: nanos(5 * 60 * 1000),
    num_replicas: 1,
    mem_storage: true,
  });
  return { consumer: js.consumers.getConsumerFromInfo(info), name: info.name, numPending: info.num_pending };
}

/** An open consumer. Iterate it once; `stop()` ends the iteration. */
export class Reader {
  readonly #consumer: Consumer;
  readonly #messages: ConsumerMessages;
  readonly #oversized: OversizedEvents;
  #stopped = false;
  /** Messages matching the filter at or after the start, when it was created. */
  readonly numPending: number;

  private constructor(consumer: Consumer, messages: ConsumerMessages, oversized: OversizedEvents, numPending: number) {
    this.#consumer = consumer;
    this.#messages = messages;
    this.#oversized = oversized;
    this.numPending = numPending;
  }

  /** Creates the consumer. Rejects if the stream does not exist (yet). */
  static async open(
    js: JetStreamClient,
    oversized: OversizedEvents,
    stream: string,
    filter: string,
    from: ReadFrom,
    logger: Logger,
  ): Promise<Reader> {
    // Always a start sequence, so a reopened reader knows where it starts.
    let start: number;
    if (from === "first") {
      start = 1;
    } else if (from === "new") {
      const info = await (await js.streams.get(stream)).info();
      start = info.state.last_seq + 1;
    } else {
      start = from;
    }
    const { consumer, numPending } = await filteredConsumer(js, stream, filter, {
      deliver_policy: DeliverPolicy.StartSequence,
      opt_start_seq: start,
    });
    const messages = await consumer.consume({
      max_messages: BATCH,
      idle_heartbeat: HEARTBEAT_MS,
      abort_on_missing_resource: true,
    });
    const reader = new Reader(consumer, messages, oversized, numPending);
    void (async () => {
      for await (const status of messages.status()) {
        switch (status.type) {
          case "heartbeats_missed":
            logger.info(`stream ${stream} ${filter}: ${JSON.stringify(status)}; reopening`);
            reader.stop();
            break;
          case "stream_not_found":
          case "consumer_deleted":
            logger.info(`stream ${stream} ${filter}: ${JSON.stringify(status)}`);
            break;
          default:
            break;
        }
      }
    })().catch(() => {});
    return reader;
  }

  /** True once `interrupt()` was called: resume after the last message seen. */
  interrupted = false;

  /**
   * Ends the iteration (also a pending `next()`) and deletes the ephemeral
   * consumer on the server (else it lingers for its 5 min inactivity
   * threshold); idempotent.
   */
  stop(): void {
    this.#messages.stop();
    if (!this.#stopped) {
      this.#stopped = true;
      this.#consumer.delete().catch(() => {});
    }
  }

  /** Ends the iteration because the connection was re-established. */
  interrupt(): void {
    this.interrupted = true;
    this.stop();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<StreamEvent, void, undefined> {
    try {
      for await (const msg of this.#messages) {
        yield await decodeMessage(msg, this.#oversized);
      }
    } finally {
      this.stop();
    }
  }
}
