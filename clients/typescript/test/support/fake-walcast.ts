/**
 * A stand-in for `walcast run` on a real nats-server, for unit tests: it
 * creates the stream, publishes `ChangeEvent`s exactly as walcast does
 * (subject, headers, oversized bodies in the object store) and answers the
 * catch-up service (SPEC §7) from what it published. Tests steer it: publish
 * out of order, duplicates, holes; force `too_old`/`ahead`/silence.
 *
 * It also writes the state bucket exactly as `docs/STATE.md` lays it out
 * (values and delete markers with `Walcast-Seq` / `Walcast-Stream-Seq`,
 * claim checks, the `_walcast.backfill` marker), for `loadAndFollow()`.
 */

import { create, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { JetStreamClient, JetStreamManager } from "@nats-io/jetstream";
import { DiscardPolicy, jetstream, jetstreamManager, RetentionPolicy, StorageType } from "@nats-io/jetstream";
import type { Msg, MsgHdrs, NatsConnection, Subscription } from "@nats-io/nats-core";
import { headers as natsHeaders } from "@nats-io/nats-core";
import { Objm } from "@nats-io/obj";
import { connect } from "@nats-io/transport-node";

import type { ChangeEvent } from "../../src/gen/walcast/v1/events_pb.js";
import { Action, ChangeEventSchema, Entity } from "../../src/gen/walcast/v1/events_pb.js";
import type { Change } from "./state-model.js";

function stateHeaders(seq: bigint, streamSeq: number): MsgHdrs {
  const h = natsHeaders();
  h.set("Walcast-Seq", seq.toString());
  h.set("Walcast-Stream-Seq", String(streamSeq));
  return h;
}

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
  /** Held across a publish and its index update, and while answering. */
  #lock: Promise<unknown> = Promise.resolve();

  private constructor(nc: NatsConnection, jsm: JetStreamManager) {
    this.nc = nc;
    this.js = jetstream(nc);
    this.jsm = jsm;
  }

  static async start(url: string, options: { service?: boolean; replicas?: number } = {}): Promise<FakeWalcast> {
    const nc = await connect({ servers: url });
    const jsm = await jetstreamManager(nc);
    await jsm.streams.add({
      name: "WALCAST",
      subjects: ["walcast.>"],
      storage: StorageType.File,
      retention: RetentionPolicy.Limits,
      allow_direct: true,
      num_replicas: options.replicas ?? 1,
    });
    const fake = new FakeWalcast(nc, jsm);
    if (options.service !== false) {
      fake.startService();
    }
    return fake;
  }

  /** Starts answering `walcast-api.v1.catchup.<tenant>` (again), the subject the client uses. */
  startService(): void {
    this.#service = this.nc.subscribe(`${this.prefix}-api.v1.catchup.*`, {
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
    return this.publishEvent(event, options);
  }

  /** Publishes `event` as walcast would; resolves with its stream sequence. */
  async publishEvent(event: ChangeEvent, options: Pick<PublishOptions, "oversized" | "msgId"> = {}): Promise<number> {
    const action = Action[event.action].toLowerCase();
    const entity = Entity[event.entity].toLowerCase();
    const h = natsHeaders();
    h.set("Nats-Msg-Id", options.msgId ?? event.eventId);
    h.set("Walcast-Tenant", event.tenantId);
    h.set("Walcast-Seq", event.seq.toString());
    h.set("Walcast-Lsn", event.commitLsn.toString());
    h.set("Content-Type", "application/x-protobuf");
    const body = await this.#claimCheck(event, options.oversized === true, h, `${this.stream}_OVERSIZED`, event.eventId);
    return this.#locked(async () => {
      const ack = await this.js.publish(`${this.prefix}.${event.tenantId}.${entity}.${action}`, body, { headers: h });
      let perSeq = this.#index.get(event.tenantId);
      if (perSeq === undefined) {
        perSeq = new Map();
        this.#index.set(event.tenantId, perSeq);
      }
      const at = perSeq.get(event.seq) ?? [];
      at.push(ack.seq);
      perSeq.set(event.seq, at);
      return ack.seq;
    });
  }

  /**
   * The body to publish: the event, or its stub after storing it in the
   * object store `bucket` as `name`. As walcast does, an event's body goes
   * to `<stream>_OVERSIZED` as `<event_id>` and a state value's to
   * `<state bucket>_OVERSIZED` as `<key>.<seq>`: one object per write, never
   * replaced while a reader may be fetching it.
   */
  async #claimCheck(event: ChangeEvent, oversized: boolean, h: MsgHdrs, bucket: string, name: string): Promise<Uint8Array> {
    const body = toBinary(ChangeEventSchema, event);
    if (!oversized) {
      return body;
    }
    const store = await new Objm(this.js).create(bucket);
    await store.putBlob({ name }, body);
    h.set("Walcast-Object", `${bucket}/${name}`);
    const stub = { ...event, after: { case: undefined }, before: { case: undefined }, extra: {} };
    return toBinary(ChangeEventSchema, create(ChangeEventSchema, stub as unknown as ChangeEvent));
  }

  #locked<T>(task: () => Promise<T>): Promise<T> {
    const result = this.#lock.then(task);
    this.#lock = result.catch(() => {});
    return result;
  }

  // --- the state bucket (docs/STATE.md) ------------------------------------

  readonly bucket = "WALCAST_STATE";

  /** The state bucket as walcast creates it: history 1, direct gets. */
  async createBucket(): Promise<void> {
    await this.jsm.streams.add({
      name: `KV_${this.bucket}`,
      subjects: [`$KV.${this.bucket}.>`],
      max_msgs_per_subject: 1,
      discard: DiscardPolicy.New,
      allow_rollup_hdrs: true,
      deny_delete: true,
      allow_direct: true,
      storage: StorageType.File,
    });
  }

  /** Publishes a change, then writes its key: the daemon's order. */
  async apply(change: Change, oversized = false): Promise<void> {
    const streamSeq = await this.publishEvent(change.event, { oversized });
    if (change.event.after.case === undefined) {
      await this.deleteRow(change.key, change.event.seq, streamSeq);
    } else {
      await this.putRow(change.key, change.event, streamSeq, oversized);
    }
  }

  /** A row's value (`Walcast-Seq` = the event's seq, 0 for a backfilled row). */
  async putRow(key: string, event: ChangeEvent, streamSeq: number, oversized = false): Promise<void> {
    const h = stateHeaders(event.seq, streamSeq);
    h.set("Content-Type", "application/x-protobuf");
    const body = await this.#claimCheck(event, oversized, h, `${this.bucket}_OVERSIZED`, `${key}.${event.seq}`);
    await this.#put(key, body, h);
  }

  /** A delete marker carrying the delete event's seq. */
  async deleteRow(key: string, seq: bigint, streamSeq: number): Promise<void> {
    const h = stateHeaders(seq, streamSeq);
    h.set("KV-Operation", "DEL");
    await this.#put(key, new Uint8Array(), h);
  }

  /** The readiness marker with `state` (`running`, `complete`, ...). */
  async setMarker(state: string): Promise<void> {
    const body = { state, snapshot_lsn: "0/1A2B3C4", rows: 0, completed_at: "2025-01-02T03:04:05Z" };
    await this.#put("_walcast.backfill", new TextEncoder().encode(JSON.stringify(body)), natsHeaders());
  }

  async #put(key: string, body: Uint8Array, h: MsgHdrs): Promise<void> {
    await this.js.publish(`$KV.${this.bucket}.${key}`, body, { headers: h });
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
    void this.#locked(() => this.#compute(request)).then(([body, h]) => this.#reply(msg, body, h));
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
