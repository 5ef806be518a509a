// subscribe() against a real nats-server and a fake walcast (publisher +
// catch-up service): order, dedup, gap repair, re-sync, errors, reconnects.
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";

import { CatchupError, GapError, subscribe, WalcastError } from "../../src/index.js";
import type { SubscribeOptions, Subscription } from "../../src/index.js";
import { Collector } from "../support/collect.js";
import { freePort } from "../support/env.js";
import { FakeWalcast } from "../support/fake-walcast.js";
import { NatsServer } from "../support/nats.js";

let nats: NatsServer;
let fake: FakeWalcast;
const open: Subscription[] = [];
const warnings: string[] = [];

function sub(options: Partial<SubscribeOptions> & { tenant: string }): Collector {
  const subscription = subscribe({
    servers: nats.url,
    requestTimeout: 500,
    maxBackoff: 300,
    repairTimeout: 3_000,
    logger: { warn: (m) => warnings.push(m), info: () => {} },
    ...options,
  });
  open.push(subscription);
  return new Collector(subscription);
}

beforeEach(async () => {
  nats = await NatsServer.start();
  fake = await FakeWalcast.start(nats.url);
  warnings.length = 0;
});

afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
  await fake.close();
  await nats.destroy();
});

describe("subscribe (one tenant)", () => {
  it("delivers the tenant's events 1..N in order, never another tenant's or a dead letter, then live ones", async () => {
    await fake.publish("A", 1);
    await fake.publish("B", 1);
    await fake.publish("A", 2);
    await fake.publishDeadLetter();
    await fake.publish("B", 2);
    await fake.publish("A", 3);
    const c = sub({ tenant: "A" });
    await c.untilEvents(3);
    await c.until("live", () => c.log.includes("live(3)"));
    await fake.publish("B", 3);
    await fake.publish("A", 4);
    await c.untilEvents(4);
    assert.deepEqual(c.log, ["A:1", "A:2", "A:3", "live(3)", "A:4"]);
    assert.deepEqual(fake.requests, [{ tenant_id: "A", after_seq: 0 }]);
    const first = c.items[0];
    assert.ok(first?.type === "event");
    assert.equal(first.subject, "walcast.A.task.created");
    assert.equal(first.event.after.case, "task");
  });

  it("starts after afterSeq where the catch-up service says", async () => {
    await fake.publishRange("A", 1, 5);
    const c = sub({ tenant: "A", afterSeq: 3 });
    await c.untilEvents(2);
    await c.until("live", () => c.log.includes("live(5)"));
    assert.deepEqual(c.log, ["A:4", "A:5", "live(5)"]);
    assert.deepEqual(fake.requests, [{ tenant_id: "A", after_seq: 3 }]);
  });

  it("afterSeq 'latest' delivers only new events", async () => {
    await fake.publishRange("A", 1, 3);
    const c = sub({ tenant: "A", afterSeq: "latest" });
    await c.until("live", () => c.log.includes("live(3)"));
    await fake.publish("A", 4);
    await c.untilEvents(1);
    assert.deepEqual(c.log, ["live(3)", "A:4"]);
  });

  it("drops duplicates by event_id and by seq", async () => {
    await fake.publish("A", 1);
    await fake.publish("A", 2);
    await fake.publish("A", 2, { msgId: "again-2" }); // same event stored twice
    await fake.publish("A", 1, { msgId: "again-1" });
    await fake.publish("A", 3);
    const c = sub({ tenant: "A" });
    await c.untilEvents(3);
    await c.until("live", () => c.log.includes("live(3)"));
    assert.deepEqual(c.events, ["A:1", "A:2", "A:3"]);
    assert.equal(c.subscription.stats.duplicates, 2);
  });

  it("repairs a gap through the catch-up service and keeps the order", async () => {
    // A3 reaches the stream after A4 (e.g. republished after a broker loss).
    await fake.publish("A", 1);
    await fake.publish("A", 2);
    await fake.publish("A", 4);
    await fake.publish("A", 3);
    await fake.publish("A", 5);
    const c = sub({ tenant: "A" });
    await c.untilEvents(5);
    await c.until("live", () => c.log.includes("live(5)"));
    assert.deepEqual(c.events, ["A:1", "A:2", "A:3", "A:4", "A:5"]);
    assert.deepEqual(fake.requests, [
      { tenant_id: "A", after_seq: 0 },
      { tenant_id: "A", after_seq: 2 },
    ]);
    const stats = c.subscription.stats;
    assert.equal(stats.gapsRepaired, 1);
    assert.equal(stats.duplicates, 1); // A3 again, read on by the main consumer
    assert.equal(stats.delivered, 5);
  });

  it("turns too_old into a resync item and goes on with the oldest event left", async () => {
    const streamSeqs = [];
    for (let seq = 1; seq <= 5; seq++) {
      streamSeqs.push(await fake.publish("A", seq));
    }
    await fake.deleteStreamSeqs(streamSeqs[0] as number, streamSeqs[1] as number); // A1, A2 aged out
    const c = sub({ tenant: "A" });
    await c.untilEvents(3);
    assert.deepEqual(c.log.slice(0, 4), ["resync(A 0→3)", "A:3", "A:4", "A:5"]);
    assert.equal(c.subscription.stats.resyncs, 1);
    const resync = c.items[0];
    assert.ok(resync?.type === "resync");
    assert.equal(resync.reason, "too_old");
  });

  it("a gap whose events aged out becomes a resync, in order", async () => {
    const s1 = await fake.publish("A", 1);
    const s2 = await fake.publish("A", 2);
    const s3 = await fake.publish("A", 3);
    const s4 = await fake.publish("A", 4);
    await fake.deleteStreamSeqs(s1, s2, s3);
    // A stale answer sends the reader to A4 first: the client sees 2 → 4.
    let first = true;
    fake.override = (r) => {
      if (first) {
        first = false;
        return {
          kind: "reply",
          body: { stream: "WALCAST", filter_subject: `walcast.${r.tenant_id}.>`, start_stream_seq: s4, last_seq: 4 },
        };
      }
      return undefined;
    };
    const c = sub({ tenant: "A", afterSeq: 2 });
    await c.untilEvents(1);
    assert.deepEqual(c.log.slice(0, 2), ["resync(A 2→4)", "A:4"]);
    assert.equal(c.subscription.stats.gapsRepaired, 1);
  });

  it("fails with GapError when events are missing from the middle of the stream", async () => {
    await fake.publish("A", 1);
    await fake.publish("A", 2);
    await fake.publish("A", 4); // A3 never stored
    const c = sub({ tenant: "A" });
    await c.until("the end", () => c.done);
    assert.deepEqual(c.events, ["A:1", "A:2"]);
    assert.ok(c.error instanceof GapError, String(c.error));
    assert.equal(c.error.expected, 3n);
    assert.equal(c.error.code, "gap");
    assert.equal(await c.subscription.closed(), c.error);
  });

  it("fails with CatchupError 'ahead' for a position past the tenant's last seq", async () => {
    await fake.publishRange("A", 1, 3);
    const c = sub({ tenant: "A", afterSeq: 10 });
    await c.until("the end", () => c.done);
    assert.ok(c.error instanceof CatchupError, String(c.error));
    assert.equal(c.error.reason, "ahead");
    assert.equal(c.error.status, 416);
  });

  it("waits for the catch-up service to appear", async () => {
    fake.stopService();
    await fake.publishRange("A", 1, 2);
    const c = sub({ tenant: "A" });
    await new Promise((r) => setTimeout(r, 400));
    assert.deepEqual(c.items, []);
    assert.ok(warnings.some((w) => w.includes("no catch-up service answers")), warnings.join("\n"));
    fake.startService();
    await c.untilEvents(2);
    assert.deepEqual(c.events, ["A:1", "A:2"]);
  });

  it("fetches oversized events from the object store", async () => {
    await fake.publish("A", 1, { oversized: true });
    await fake.publish("A", 2);
    const c = sub({ tenant: "A" });
    await c.untilEvents(2);
    const item = c.items[0];
    assert.ok(item?.type === "event");
    assert.equal(item.event.after.case, "task");
    assert.equal(item.event.after.value.metadata?.length, 2_000_000);
  });

  it("survives a NATS restart", async () => {
    await fake.publishRange("A", 1, 3);
    const c = sub({ tenant: "A", connectOptions: { reconnectTimeWait: 100 } });
    await c.untilEvents(3);
    await nats.stop();
    await nats.start();
    const { waitFor } = await import("../support/env.js");
    await waitFor("the fake's connection to be back", () => fake.nc.flush().then(() => true), 10_000, 100);
    for (let seq = 4; seq <= 6; seq++) {
      await fake.publish("A", seq);
    }
    await c.untilEvents(6, 20_000);
    assert.deepEqual(c.events, ["A:1", "A:2", "A:3", "A:4", "A:5", "A:6"]);
  });
});

describe("subscribe (all tenants)", () => {
  it("delivers every tenant's events in stream order, without dead letters", async () => {
    await fake.publish("A", 1);
    await fake.publish("B", 1);
    await fake.publishDeadLetter();
    await fake.publish("A", 2);
    const c = sub({ tenant: "*" });
    await c.untilEvents(3);
    await c.until("live", () => c.log.includes("live(*)"));
    await fake.publish("B", 2);
    await c.untilEvents(4);
    assert.deepEqual(c.log, ["A:1", "B:1", "A:2", "live(*)", "B:2"]);
  });

  it("resumes from per-tenant positions", async () => {
    await fake.publish("A", 1);
    await fake.publish("B", 1);
    await fake.publish("A", 2);
    await fake.publish("C", 1);
    await fake.publish("B", 2);
    const c = sub({ tenant: "*", positions: { A: 1, B: 1 } });
    await c.untilEvents(3);
    // Starts at A2 (the earliest needed); C is unlisted, so from there on.
    assert.deepEqual(c.events, ["A:2", "C:1", "B:2"]);
  });

  it("repairs a gap of one tenant without holding up the order of others", async () => {
    await fake.publish("A", 1);
    await fake.publish("A", 3);
    await fake.publish("B", 1);
    await fake.publish("A", 2);
    const c = sub({ tenant: "*" });
    await c.untilEvents(4);
    assert.deepEqual(c.events, ["A:1", "A:2", "A:3", "B:1"]);
  });
});

describe("subscribe (lifecycle)", () => {
  it("callbacks: events, live, close", async () => {
    await fake.publishRange("A", 1, 2);
    const seen: string[] = [];
    let live = false;
    const errors: WalcastError[] = [];
    const s = subscribe(
      { servers: nats.url, tenant: "A" },
      {
        onEvent: async (event) => {
          await new Promise((r) => setTimeout(r, 5));
          seen.push(`${event.tenantId}:${event.seq}`);
        },
        onLive: () => {
          live = true;
        },
        onError: (err) => errors.push(err),
      },
    );
    open.push(s);
    const { waitFor } = await import("../support/env.js");
    await waitFor("live", () => live && seen.length === 2, 10_000);
    assert.deepEqual(seen, ["A:1", "A:2"]);
    await s.close();
    assert.equal(await s.closed(), undefined);
    assert.deepEqual(errors, []);
    assert.throws(() => s[Symbol.asyncIterator](), WalcastError);
  });

  it("callbacks: a throwing handler ends the subscription with code 'handler'", async () => {
    await fake.publishRange("A", 1, 2);
    let reported: WalcastError | undefined;
    const s = subscribe(
      { servers: nats.url, tenant: "A" },
      {
        onEvent: () => {
          throw new Error("boom");
        },
        onError: (err) => {
          reported = err;
        },
      },
    );
    open.push(s);
    const ended = await s.closed();
    assert.equal(ended?.code, "handler");
    assert.equal(reported, ended);
  });

  it("close() interrupts a subscription still waiting for its server", async () => {
    const port = await freePort();
    const s = subscribe({ servers: `nats://127.0.0.1:${port}`, tenant: "A" });
    const c = new Collector(s);
    await new Promise((r) => setTimeout(r, 200));
    const started = Date.now();
    await s.close();
    await c.finished;
    assert.ok(Date.now() - started < 2_000);
    assert.equal(c.error, undefined);
    assert.deepEqual(c.items, []);
  });

  it("breaking out of for-await closes the subscription", async () => {
    await fake.publishRange("A", 1, 3);
    const s = subscribe({ servers: nats.url, tenant: "A" });
    const got: bigint[] = [];
    for await (const item of s) {
      if (item.type === "event") {
        got.push(item.event.seq);
        if (got.length === 2) {
          break;
        }
      }
    }
    assert.deepEqual(got, [1n, 2n]);
    assert.equal(await s.closed(), undefined);
  });

  it("leaves no consumer behind on the server", async () => {
    await fake.publish("A", 1);
    await fake.publish("A", 3);
    await fake.publish("A", 2); // a repair opens a second consumer
    const c = sub({ tenant: "A" });
    await c.untilEvents(3);
    await c.subscription.close();
    const { waitFor } = await import("../support/env.js");
    await waitFor(
      "consumers to be deleted",
      async () => (await fake.jsm.consumers.list(fake.stream).next()).length === 0,
      5_000,
    );
  });

  it("is iterable once", () => {
    const s = subscribe({ servers: nats.url, tenant: "A" });
    open.push(s);
    s[Symbol.asyncIterator]();
    assert.throws(() => s[Symbol.asyncIterator](), (e: unknown) => e instanceof WalcastError && e.code === "invalid_options");
  });

  it("a closed shared connection ends the subscription with connection_closed", async () => {
    await fake.publishRange("A", 1, 1);
    const { connect } = await import("@nats-io/transport-node");
    const nc = await connect({ servers: nats.url });
    const c = new Collector(subscribe({ connection: nc, tenant: "A" }));
    await c.untilEvents(1);
    await nc.close();
    await c.until("the end", () => c.done);
    assert.equal(c.error?.code, "connection_closed");
  });
});
