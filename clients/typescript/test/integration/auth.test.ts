// @walcast/client with a tenant token, through walcast's auth callout (SPEC
// §9): nats-server runs the shipped deploy/nats/auth-callout.conf with the
// docker-compose demo keys, `walcast run` answers the callout, and the
// client connects with an HS256 token and its tenant's inbox prefix — the
// permissions a browser gets. It loads and follows its tenant, and replays
// it from seq 0 through the tenant-scoped catch-up subject.
//
// The client creates its consumers without reading STREAM.INFO (which a
// tenant user may not: with `subjects_filter` it lists every tenant's
// subjects), unlike nats.js' ordered consumers (src/reader.ts).
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import type pg from "pg";

import { loadAndFollow, subscribe } from "../../src/index.js";
import type { LoadItem, Subscription } from "../../src/index.js";
import { calloutEnv, startCalloutNats, token } from "../support/callout.js";
import { Collector } from "../support/collect.js";
import type { NatsServer } from "../support/nats.js";
import { PostgresServer } from "../support/postgres.js";
import { WalcastDaemon } from "../support/walcast.js";
import { Workload } from "../support/workload.js";

const A = "acme";
const B = "globex";

let postgres: PostgresServer;
let nats: NatsServer;
let walcast: WalcastDaemon;
let db: pg.Client;
let workload: Workload;
const open: Subscription<LoadItem>[] = [];

/** What a browser of `tenant` would pass: its token and inbox prefix. */
const asTenant = (tenant: string) => ({ token: token(tenant), inboxPrefix: `_INBOX_${tenant}` });

describe("@walcast/client as a tenant user of walcast's auth callout", { timeout: 120_000 }, () => {
  before(async () => {
    let walcastUrl: string;
    [postgres, { nats, walcastUrl }] = await Promise.all([PostgresServer.start(), startCalloutNats()]);
    walcast = await WalcastDaemon.migrated(postgres.url, walcastUrl);
    Object.assign(walcast.env, calloutEnv());
    await walcast.start();
    db = await postgres.client();
    workload = new Workload(db);
  });

  after(async () => {
    await Promise.all(open.map((s) => s.close()));
    await db?.end().catch(() => {});
    await walcast?.destroy();
    await nats?.destroy();
    await postgres?.destroy();
  });

  it("loads and follows its own tenant and replays it via the scoped catch-up, never another's", async () => {
    await workload.round(A, "before");
    await workload.round(B, "before");
    const load = loadAndFollow({
      servers: nats.url,
      tenant: A,
      connectOptions: asTenant(A),
      logger: { warn: (m) => console.log(`[load ${A}] ${m}`), info: () => {} },
    });
    open.push(load);
    const items = load[Symbol.asyncIterator]();
    const first = await items.next();
    assert.ok(!first.done && first.value.type === "snapshot", `snapshot first: ${JSON.stringify(first.value?.type)}`);
    const snapshot = first.value;
    assert.ok(snapshot.rows.size > 0, "the tenant's rows");
    assert.ok([...snapshot.rows.keys()].every((k) => k.startsWith(`${A}.`)), "only its own keys");

    await workload.round(B, "after");
    await workload.round(A, "after");
    const n = workload.expectedFor(A).length;
    const history = subscribe({ servers: nats.url, tenant: A, connectOptions: asTenant(A) });
    open.push(history as unknown as Subscription<LoadItem>);
    const replay = new Collector(history);
    await replay.untilEvents(n, 30_000);
    assert.deepEqual(
      replay.events,
      Array.from({ length: n }, (_, i) => `${A}:${i + 1}`),
      "seq 1..N of its own tenant, via catch-up",
    );
    let seq = snapshot.asOfSeq;
    while (seq < BigInt(n)) {
      const next = await items.next();
      assert.ok(!next.done && next.value.type === "event");
      assert.equal(next.value.event.tenantId, A);
      assert.equal(next.value.event.seq, seq + 1n);
      seq = next.value.event.seq;
    }
  });
});
