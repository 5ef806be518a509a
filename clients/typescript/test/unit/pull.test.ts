// pull.ts reads a consumer to its end with its own pull requests: against a
// real nats-server, every message once and in order, across many requests;
// a deleted consumer, a failing callback or an abort end the read.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { connect } from "@nats-io/transport-node";
import type { Msg, NatsConnection } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { JetStreamManager } from "@nats-io/jetstream";

import { parseDelivery, PullBroken, pullAll } from "../../src/pull.js";
import type { PullRead } from "../../src/pull.js";
import { waitFor } from "../support/env.js";
import { NatsServer } from "../support/nats.js";

let nats: NatsServer;
let nc: NatsConnection;
let jsm: JetStreamManager;

before(async () => {
  nats = await NatsServer.start();
  nc = await connect({ servers: nats.url });
  jsm = await jetstreamManager(nc);
});

after(async () => {
  await nc.close();
  await nats.destroy();
});

/** A stream `name` holding `count` messages `name.<i>` (payload: i). */
async function filled(name: string, count: number): Promise<void> {
  await jsm.streams.add({ name, subjects: [`${name}.>`] });
  const js = jetstream(nc);
  for (let i = 1; i <= count; i++) {
    await js.publish(`${name}.${i}`, new TextEncoder().encode(String(i)));
  }
}

/** A consumer of every message of `stream`, as the state read makes them (no acks). */
async function consumerOf(stream: string): Promise<{ name: string; numPending: number }> {
  const info = await jsm.consumers.add(stream, {
    name: `c${Math.random().toString(36).slice(2)}`,
    deliver_policy: DeliverPolicy.All,
    ack_policy: AckPolicy.None,
    mem_storage: true,
  });
  return { name: info.name, numPending: info.num_pending };
}

function read(stream: string, c: { name: string; numPending: number }, onMessage: (msg: Msg) => void, more: Partial<PullRead> = {}): Promise<void> {
  return pullAll({
    nc,
    stream,
    consumer: c.name,
    numPending: c.numPending,
    batch: 8,
    stallMs: 5_000,
    signal: new AbortController().signal,
    onMessage,
    ...more,
  });
}

describe("pullAll", () => {
  it("reads every message once, in order, across many pull requests", async () => {
    await filled("ALL", 100);
    const c = await consumerOf("ALL");
    assert.equal(c.numPending, 100);
    const seen: string[] = [];
    await read("ALL", c, (msg) => seen.push(msg.string()));
    assert.deepEqual(seen, Array.from({ length: 100 }, (_, i) => String(i + 1)));
  });

  it("goes on to the messages written during the read", async () => {
    await filled("MORE", 20);
    const c = await consumerOf("MORE");
    const js = jetstream(nc);
    // Stored before the read starts but after the consumer counted its
    // pending: the read must not stop at the 20th message.
    for (let i = 21; i <= 30; i++) {
      await js.publish(`MORE.${i}`, new TextEncoder().encode(String(i)));
    }
    // The server counts a stored message into its consumers' pending after
    // the publish is acknowledged (the stream signals them through a queue),
    // so a read at once may rightly end at the 28th: wait until the consumer
    // counts all 30, then the read has to reach the 30th.
    await waitFor("the consumer to count 30 pending", async () => (await jsm.consumers.info("MORE", c.name)).num_pending === 30, 5_000, 5);
    const seen: string[] = [];
    await read("MORE", c, (msg) => seen.push(msg.string()));
    assert.deepEqual(seen, Array.from({ length: 30 }, (_, i) => String(i + 1)));
  });

  it("resolves at once when nothing is pending", async () => {
    await jsm.streams.add({ name: "NONE", subjects: ["NONE.>"] });
    const c = await consumerOf("NONE");
    let calls = 0;
    await read("NONE", c, () => calls++);
    assert.equal(calls, 0);
  });

  it("rejects with what the callback throws", async () => {
    await filled("THROWS", 10);
    const c = await consumerOf("THROWS");
    const boom = new Error("boom");
    await assert.rejects(
      read("THROWS", c, (msg) => {
        if (msg.string() === "3") {
          throw boom;
        }
      }),
      (err) => err === boom,
    );
  });

  it("breaks when the consumer is deleted during the read", async () => {
    await filled("GONE", 40);
    const c = await consumerOf("GONE");
    let n = 0;
    await assert.rejects(
      read(
        "GONE",
        c,
        () => {
          if (++n === 2) {
            void jsm.consumers.delete("GONE", c.name);
          }
        },
        { batch: 2, stallMs: 2_000 },
      ),
      PullBroken,
    );
    assert.ok(n < 40, `read ${n} messages of a deleted consumer`);
  });

  it("breaks when aborted", async () => {
    await filled("ABORT", 5);
    const c = await consumerOf("ABORT");
    const abort = new AbortController();
    abort.abort();
    await assert.rejects(read("ABORT", c, () => {}, { signal: abort.signal }), /closed/);
  });
});

describe("parseDelivery", () => {
  it("reads the consumer sequence and pending of both reply forms", () => {
    assert.deepEqual(parseDelivery("$JS.ACK.KV_S.c1.1.77.12.1700000000000000000.5"), { consumerSeq: 12, pending: 5 });
    assert.deepEqual(parseDelivery("$JS.ACK._.ACCHASH.KV_S.c1.1.77.12.1700000000000000000.0.rnd"), { consumerSeq: 12, pending: 0 });
    assert.deepEqual(parseDelivery("$JS.ACK.hub.ACCHASH.KV_S.c1.1.77.12.1700000000000000000.3"), { consumerSeq: 12, pending: 3 });
  });

  it("refuses anything else", () => {
    assert.equal(parseDelivery(""), undefined);
    assert.equal(parseDelivery("_INBOX.abc.def"), undefined);
    assert.equal(parseDelivery("$JS.ACK.S.c.1.2.x.4.5"), undefined);
    assert.equal(parseDelivery("$JS.NAK.S.c.1.2.3.4.5"), undefined);
  });
});
