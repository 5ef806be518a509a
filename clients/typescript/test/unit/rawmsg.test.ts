// rawmsg.ts reads nats.js internals: against a real nats-server and the
// pinned nats.js, every message must take that path and read exactly what
// the public API reads (subject, header values, payload).
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { connect, headers as natsHeaders } from "@nats-io/transport-node";
import type { Msg, NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";

import { create, toBinary } from "@bufbuild/protobuf";

import { ChangeEventSchema } from "../../src/index.js";
import { pullAll } from "../../src/pull.js";
import { hasReply, headerName, headerValues, rawParts, replyText, text } from "../../src/rawmsg.js";
import type { StateContext } from "../../src/state.js";
import { recordRow, RowsBuilder } from "../../src/state.js";
import { NatsServer } from "../support/nats.js";

let nats: NatsServer;
let nc: NatsConnection;

before(async () => {
  nats = await NatsServer.start();
  nc = await connect({ servers: nats.url });
});

after(async () => {
  await nc.close();
  await nats.destroy();
});

/** Header lines to send, as [name, value] (appended in order). */
const CASES: Array<{ subject: string; headers?: Array<[string, string]>; payload: Uint8Array }> = [
  { subject: "acme.task.1", headers: [["Walcast-Seq", "42"], ["Content-Type", "application/x-protobuf"]], payload: new Uint8Array([1, 2, 3]) },
  { subject: "acme.task.2", payload: new Uint8Array([9]) },
  { subject: "acme.task.3", headers: [["Walcast-Seq", "7"], ["Walcast-Seq", "8"], ["walcast-seq", "9"]], payload: new Uint8Array(0) },
  { subject: "acme.task.4", headers: [["Walcast-Object", "  padded\t"], ["KV-Operation", "DEL"]], payload: new Uint8Array([0xff, 0x00]) },
  { subject: "ünï.task.5", headers: [["Walcast-Object", "wert-ä-€"], ["X-Other", "a:b:c"]], payload: new TextEncoder().encode("é") },
  { subject: "acme.lock.task." + "x".repeat(300), headers: [["Walcast-Seq", "1".repeat(200)]], payload: new Uint8Array(70_000).fill(7) },
];

const NAMES = ["Walcast-Seq", "KV-Operation", "Walcast-Object", "X-Other", "Missing"];

/** The cases as stored in `stream`, received the way the state read receives them (`pull.ts`). */
async function received(stream: string, cases: typeof CASES): Promise<Msg[]> {
  const jsm = await jetstreamManager(nc);
  await jsm.streams.add({ name: stream, subjects: [`${stream}.>`] });
  const js = jetstream(nc);
  for (const c of cases) {
    let h;
    if (c.headers !== undefined) {
      h = natsHeaders();
      for (const [k, v] of c.headers) {
        h.append(k, v);
      }
    }
    await js.publish(`${stream}.${c.subject}`, c.payload, h === undefined ? {} : { headers: h });
  }
  const info = await jsm.consumers.add(stream, { name: "all", deliver_policy: DeliverPolicy.All, ack_policy: AckPolicy.None });
  const out: Msg[] = [];
  await pullAll({
    nc,
    stream,
    consumer: info.name,
    numPending: info.num_pending,
    batch: 4,
    stallMs: 5_000,
    signal: new AbortController().signal,
    onMessage: (msg) => out.push(msg),
  });
  return out;
}

describe("rawParts", () => {
  it("reads what the public API reads, from the pinned nats.js' buffers", async () => {
    const messages = await received("RAW", CASES);
    assert.equal(messages.length, CASES.length);
    const wanted = NAMES.map(headerName);
    const values = NAMES.map(() => "");
    for (const msg of messages) {
      const raw = rawParts(msg);
      assert.ok(raw !== undefined, "the pinned nats.js must take the raw path (see rawmsg.ts)");
      assert.equal(text(raw.subject, 0, raw.subject.length), msg.subject);
      assert.deepEqual(raw.bytes.subarray(raw.headerEnd), msg.data);
      headerValues(raw, wanted, values);
      const expected = NAMES.map((name) => msg.headers?.get(name) ?? "");
      assert.deepEqual(values, expected, msg.subject);
      assert.ok(hasReply(msg));
      assert.equal(replyText(msg), msg.reply);
    }
    // The cases exercise what they mean to: first value wins, exact names, trim, UTF-8.
    const [, , third, fourth, fifth] = messages.map((m) => NAMES.map((n) => m.headers?.get(n) ?? ""));
    assert.equal(third![0], "7");
    assert.deepEqual(fourth!.slice(1, 3), ["DEL", "padded"]);
    assert.deepEqual(fifth!.slice(2, 4), ["wert-ä-€", "a:b:c"]);
  });

  it("returns undefined for a message it cannot read", () => {
    assert.equal(rawParts({} as Msg), undefined);
    assert.equal(rawParts({ _msg: { subject: "s", hdr: 0 }, _rdata: new Uint8Array(0) } as unknown as Msg), undefined);
    assert.equal(rawParts({ _msg: { subject: new Uint8Array(1), hdr: 5 }, _rdata: new Uint8Array(2) } as unknown as Msg), undefined);
    // Without nats.js' fields, the reply comes from the public API.
    assert.equal(replyText({ reply: "r.1" } as unknown as Msg), "r.1");
    assert.equal(hasReply({ reply: "" } as unknown as Msg), false);
    assert.equal(hasReply({ _msg: { subject: new Uint8Array(1), reply: undefined } } as unknown as Msg), false);
  });
});

/** A message seen only through nats.js' public API (no internals to read). */
function publicOnly(msg: Msg): Msg {
  return { subject: msg.subject, reply: msg.reply, headers: msg.headers, data: msg.data } as unknown as Msg;
}

function value(seq: bigint, tenantId = "acme", id = "1"): Uint8Array {
  return toBinary(ChangeEventSchema, create(ChangeEventSchema, { seq, tenantId, entityId: id }));
}

describe("recordRow", () => {
  it("builds the same rows through the raw path and through the public API", async () => {
    const rows: typeof CASES = [
      { subject: "acme.task.1", headers: [["Walcast-Seq", "3"]], payload: value(3n) },
      { subject: "acme.task.2", headers: [["Walcast-Seq", "0"], ["Content-Type", "x"]], payload: value(0n, "acme", "2") },
      { subject: "acme.task.1", headers: [["Walcast-Seq", "5"]], payload: value(5n) },
      { subject: "acme.task.3", headers: [["Walcast-Seq", "6"]], payload: value(6n, "acme", "3") },
      { subject: "acme.task.3", headers: [["Walcast-Seq", "7"], ["KV-Operation", "DEL"]], payload: new Uint8Array(0) },
      { subject: "acme.task.4", headers: [["Walcast-Seq", "8"]], payload: value(9n) }, // seq mismatch: an error if it stays
      { subject: "acme.task.4", headers: [["Walcast-Seq", "9"]], payload: value(9n, "acme", "4") }, // ...it does not
      { subject: "_walcast.backfill", headers: [], payload: new TextEncoder().encode("{}") }, // the marker: skipped
    ];
    const messages = await received("ROWS", rows);
    const ctx = {} as StateContext;
    const viaRaw = new RowsBuilder("acme");
    const viaPublic = new RowsBuilder("acme");
    for (const msg of messages) {
      assert.ok(rawParts(msg) !== undefined);
      recordRow("ROWS.", msg, viaRaw);
      recordRow("ROWS.", publicOnly(msg), viaPublic);
    }
    const a = await viaRaw.finish(ctx);
    const b = await viaPublic.finish(ctx);
    assert.equal(a.asOfSeq, 9n);
    assert.deepEqual([...a.rows.keys()].sort(), ["acme.task.1", "acme.task.2", "acme.task.4"]);
    assert.equal(a.rows.get("acme.task.1")?.seq, 5n);
    assert.deepStrictEqual(a, b);
  });

  it("reports a malformed value that no later message replaced", async () => {
    const messages = await received("BAD", [
      { subject: "acme.task.1", headers: [["Walcast-Seq", "4"]], payload: value(5n) },
    ]);
    const rows = new RowsBuilder("acme");
    recordRow("BAD.", messages[0]!, rows);
    await assert.rejects(rows.finish({} as StateContext), /state key acme.task.1: Walcast-Seq 4 of acme, but the value is seq 5/);
  });
});
