/**
 * A stand-in for `walcast run` on a real nats-server, for unit tests: it
 * creates the stream, publishes `ChangeEvent`s exactly as walcast does
 * (subject, headers, oversized bodies in the object store) and answers the
 * catch-up service (SPEC §7) from what it published. Tests steer it: publish
 * out of order, duplicates, holes; force `too_old`/`ahead`/silence.
 */

import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { jetstream, jetstreamManager, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import type { Msg, NatsConnection, Subscription } from "@nats-io/nats-core";
import { headers as natsHeaders } from "@nats-io/nats-core";
import { Objm } from "@nats-io/obj";
import { connect } from "@nats-io/transport-node";

import type { ChangeEvent } from "../../src/gen/walcast/v1/events_pb.js";
import { Action, ChangeEventSchema, Entity } from "../../src/gen/walcast/v1/events_pb.js";

export interface PublishOptions {
  /** Default `${tenant}-${seq}`. */
  eventId?: string;
  entity?: Entity;
  action?: Action;
  title?: string;
  /** Store the full event in the object store and publish a stripped body. */
  oversized?: boolean;
  /** Nats-Msg-Id header; default the event id. Use a unique one to store a duplicate. */
  msgId?: string;
}

export interface CatchupRequest {
  tenant_id: string;
  after_seq: number;
}

/** What the fake catch-up service answers; `undefined` = compute as walcast would. */
export type CatchupOverride =
  | { kind: "reply"; body: unknown; headers?: Record<string, string> }
  | { kind: "silent" }
  | undefined;

export class FakeWalcast {
  readonly nc: NatsConnection;
  readonly js: JetStreamClient;
  readonly jsm: JetStreamManager;
  readonly stream = "WALCAST";
  readonly prefix = "walcast";
  /** Every catch-up request received, in order. */
  readonly requests: CatchupRequest[] = [];
  /** Lets a test answer a request itself. */
  override: (request: CatchupRequest) => CatchupOverride = () => undefined;
  /** tenant → seq → stream sequences it was stored at (in order). */
  readonly #index = new Map<string, Map<bigint, number[]>>();
  #service: Subscription | undefined;

  private constructor(nc: NatsConnection, jsm: JetStreamManager) {
    this.nc = nc;
    this.js = jetstream(nc);
    this.jsm = jsm;
  }

  static async start(url: string, options: { service?: boolean } = {}): Promise<FakeWalcast> {
    const nc = await connect({ servers: url });
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({
      name: "WALCAST",
      subjects: ["walcast.>"],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      allow_direct: true,
    });
    const fake = new FakeWalcast(nc, jsm);
    if (options.service !== false) {
      fake.startService();
    }
    return fake;
  }

  /** Starts answering `walcast-api.v1.catchup` (again). */
  startService(): void {
    this.#service = this.nc.subscribe(`${this.prefix}-api.v1.catchup`, {
      callback: (err, msg) => {
        if (err === null) {
          this.#answer(msg);
        }
      },
    });
  }

  stopService(): void {
    this.#service?.unsubscribe();
    this.#service = undefined;
  }

  /** Builds a task event as walcast would. */
  event(tenant: string, seq: number | bigint, options: PublishOptions = {}): ChangeEvent {
    const s = BigInt(seq);
    const entity = options.entity ?? Entity.TASK;
    const id = `00000000-0000-4000-8000-${s.toString().padStart(12, "0")}`;
    return create(ChangeEventSchema, {
      eventId: options.eventId ?? `${tenant}-${s}`,
      tenantId: tenant,
      seq: s,
      entity,
      action: options.action ?? Action.CREATED,
      entityId: id,
      commitLsn: 1000n + s,
      commitTime: timestampFromDate(new Date("2025-01-02T03:04:05.678Z")),
      xid: 700n + s,
      txIndex: 0,
      table: "public.tasks",
      after: {
        case: "task",
        value: {
          id,
          tenantId: tenant,
          title: options.title ?? `task ${s}`,
          status: "todo",
          version: 1n,
          metadata: options.oversized ? "x".repeat(2_000_000) : undefined,
        },
      },
    });
  }

  /** Publishes one event; resolves with its stream sequence. */
  async publish(tenant: string, seq: number | bigint, options: PublishOptions = {}): Promise<number> {
    const event = this.event(tenant, seq, options);
    const action = Action[event.action].toLowerCase();
    const entity = Entity[event.entity].toLowerCase();
    const h = natsHeaders();
    h.set("Nats-Msg-Id", options.msgId ?? event.eventId);
    h.set("Walcast-Tenant", tenant);
    h.set("Walcast-Seq", event.seq.toString());
    h.set("Walcast-Lsn", event.commitLsn.toString());
    h.set("Content-Type", "application/x-protobuf");
    let body = toBinary(ChangeEventSchema, event);
    if (options.oversized) {
      const bucket = `${this.stream}_OVERSIZED`;
      const store = await new Objm(this.js).create(bucket);
      await store.putBlob({ name: event.eventId }, body);
      h.set("Walcast-Object", `${bucket}/${event.eventId}`);
      const stub = { ...event, after: { case: undefined }, before: { case: undefined }, extra: {} };
      body = toBinary(ChangeEventSchema, create(ChangeEventSchema, stub as unknown as ChangeEvent));
    }
    const ack = await this.js.publish(`${this.prefix}.${tenant}.${entity}.${action}`, body, { headers: h });
    let perSeq = this.#index.get(tenant);
    if (perSeq === undefined) {
      perSeq = new Map();
      this.#index.set(tenant, perSeq);
    }
    const at = perSeq.get(event.seq) ?? [];
    at.push(ack.seq);
    perSeq.set(event.seq, at);
    return ack.seq;
  }

  /** Publishes seqs `from..to` of `tenant`. */
  async publishRange(tenant: string, from: number, to: number): Promise<void> {
    for (let seq = from; seq <= to; seq++) {
      await this.publish(tenant, seq);
    }
  }

  /** A dead letter (`walcast._deadletter`, no tenant seq). */
  async publishDeadLetter(): Promise<void> {
    const event = create(ChangeEventSchema, { eventId: "dead-1", seq: 0n, entity: Entity.TASK, action: Action.CREATED });
    const h = natsHeaders();
    h.set("Nats-Msg-Id", event.eventId);
    h.set("Walcast-Reason", "invalid tenant id");
    await this.js.publish(`${this.prefix}._deadletter`, toBinary(ChangeEventSchema, event), { headers: h });
  }

  /** Deletes stored messages (simulates max-age expiry of a tenant's old events). */
  async deleteStreamSeqs(...seqs: number[]): Promise<void> {
    for (const seq of seqs) {
      await this.jsm.streams.deleteMessage(this.stream, seq, false);
    }
    for (const perSeq of this.#index.values()) {
      for (const [seq, at] of perSeq) {
        const left = at.filter((s) => !seqs.includes(s));
        if (left.length === 0) {
          perSeq.delete(seq);
        } else {
          perSeq.set(seq, left);
        }
      }
    }
  }

  async close(): Promise<void> {
    await this.nc.close();
  }

  #answer(msg: Msg): void {
    let request: CatchupRequest;
    try {
      request = msg.json<CatchupRequest>();
    } catch {
      this.#reply(msg, { error: "bad_request" }, { "Nats-Service-Error-Code": "400", "Nats-Service-Error": "bad_request" });
      return;
    }
    this.requests.push(request);
    const forced = this.override(request);
    if (forced?.kind === "silent") {
      return;
    }
    if (forced?.kind === "reply") {
      this.#reply(msg, forced.body, forced.headers ?? {});
      return;
    }
    void this.#compute(request).then(([body, h]) => this.#reply(msg, body, h));
  }

  async #compute(request: CatchupRequest): Promise<[unknown, Record<string, string>]> {
    const perSeq = this.#index.get(request.tenant_id) ?? new Map<bigint, number[]>();
    const seqs = [...perSeq.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    const last = seqs.length === 0 ? 0n : (seqs[seqs.length - 1] as bigint);
    const oldest = seqs[0] ?? 0n;
    const after = BigInt(request.after_seq);
    if (after > last) {
      return [{ error: "ahead", last_seq: Number(last) }, { "Nats-Service-Error-Code": "416", "Nats-Service-Error": "ahead" }];
    }
    const info = await this.jsm.streams.info(this.stream);
    const filter = `${this.prefix}.${request.tenant_id}.>`;
    if (after === last) {
      return [{ stream: this.stream, filter_subject: filter, start_stream_seq: info.state.last_seq + 1, last_seq: Number(last) }, {}];
    }
    const at = perSeq.get(after + 1n);
    if (at === undefined || after + 1n < oldest) {
      return [
        { error: "too_old", oldest_seq: Number(oldest), last_seq: Number(last) },
        { "Nats-Service-Error-Code": "410", "Nats-Service-Error": "too_old" },
      ];
    }
    return [{ stream: this.stream, filter_subject: filter, start_stream_seq: Math.min(...at), last_seq: Number(last) }, {}];
  }

  #reply(msg: Msg, body: unknown, extra: Record<string, string>): void {
    const h = natsHeaders();
    for (const [k, v] of Object.entries(extra)) {
      h.set(k, v);
    }
    msg.respond(JSON.stringify(body), { headers: h });
  }
}
