// Against the real thing: a throwaway Postgres and nats-server, `walcast
// migrate` + `walcast run` (target/debug/walcast), a two-tenant workload, a
// NATS restart in the middle.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import type pg from "pg";

import { execFile } from "node:child_process";
import { promisify } from "node:util";

import { Action, CatchupError, Entity, subscribe, toJSON } from "../../src/index.js";
import type { Subscription, SubscribeOptions } from "../../src/index.js";
import { Collector } from "../support/collect.js";
import { walcastBin } from "../support/env.js";
import { NatsServer } from "../support/nats.js";
import { PostgresServer } from "../support/postgres.js";
import { WalcastDaemon } from "../support/walcast.js";
import { Workload } from "../support/workload.js";

const execFileAsync = promisify(execFile);

const A = "acme";
const B = "globex";

let postgres: PostgresServer;
let nats: NatsServer;
let walcast: WalcastDaemon;
let db: pg.Client;
let workload: Workload;
const subscriptions: Subscription[] = [];

function sub(options: Partial<SubscribeOptions> & { tenant: string }): Collector {
  const s = subscribe({
    servers: nats.url,
    connectOptions: { reconnectTimeWait: 250 },
    logger: { warn: (m) => console.log(`[client ${options.tenant}] ${m}`), info: () => {} },
    ...options,
  });
  subscriptions.push(s);
  return new Collector(s);
}

const describeEvent = (e: { entity: Entity; action: Action; entityId: string }) =>
  `${Entity[e.entity]} ${Action[e.action]} ${e.entityId}`;

describe("@walcast/client against walcast run", { timeout: 120_000 }, () => {
  before(async () => {
    [postgres, nats] = await Promise.all([PostgresServer.start(), NatsServer.start()]);
    walcast = await WalcastDaemon.start(postgres.url, nats.url);
    db = await postgres.client();
    workload = new Workload(db);
  });

  after(async () => {
    await Promise.all(subscriptions.map((s) => s.close()));
    await db?.end().catch(() => {});
    await walcast?.destroy();
    await nats?.destroy();
    await postgres?.destroy();
  });

  it("a subscriber of tenant A gets exactly A's events 1..N in order, never B's, through a NATS restart", async () => {
    const a = sub({ tenant: A });
    const all = sub({ tenant: "*" });
    await a.until("live", () => a.log.includes("live(0)"), 20_000);

    for (const label of ["r1", "r2"]) {
      await workload.round(A, label);
      await workload.round(B, label);
    }
    await a.untilEvents(13, 20_000); // flowing before the restart

    await nats.stop();
    // Committed while NATS is down: walcast holds them in the slot.
    await workload.round(A, "outage");
    await workload.round(B, "outage");
    await new Promise((r) => setTimeout(r, 500));
    await nats.start();
    const restarted = Date.now();

    for (const label of ["r4", "r5"]) {
      await workload.round(B, label);
      await workload.round(A, label);
    }

    const expected = workload.expectedFor(A);
    const n = expected.length;
    assert.equal(n, 65);
    // Bounded: recovery must not wait for the NATS client's 30 s retry.
    await a.untilEvents(n, 20_000);
    const recoveredMs = Date.now() - restarted;
    // Nothing more may come.
    await new Promise((r) => setTimeout(r, 500));

    const events = a.items.flatMap((i) => (i.type === "event" ? [i] : []));
    assert.deepEqual(
      events.map((e) => e.event.seq),
      Array.from({ length: n }, (_, i) => BigInt(i + 1)),
      "seq 1..N, in order, each once",
    );
    assert.ok(events.every((e) => e.event.tenantId === A && e.subject.startsWith(`walcast.${A}.`)), "only tenant A");
    assert.deepEqual(events.map((e) => describeEvent(e.event)), expected.map(describeEvent), "the workload's changes");
    assert.equal(new Set(events.map((e) => e.event.eventId)).size, n, "unique event ids");
    assert.equal(a.error, undefined);
    assert.deepEqual(
      a.items.filter((i) => i.type !== "event").map((i) => i.type),
      ["live"],
      "no re-sync",
    );

    // The all-tenants subscriber saw both tenants, each 1..N in order.
    await all.untilEvents(2 * n, 20_000);
    console.log(`NATS restart → all ${n} events of ${A} delivered in ${recoveredMs} ms`);
    for (const tenant of [A, B]) {
      const seqs = all.items.flatMap((i) => (i.type === "event" && i.event.tenantId === tenant ? [i.event.seq] : []));
      assert.deepEqual(seqs, Array.from({ length: n }, (_, i) => BigInt(i + 1)), `all-tenants view of ${tenant}`);
    }
  });

  it("a late subscriber resumes after a seq through the real catch-up service", async () => {
    const n = workload.expectedFor(A).length;
    const c = sub({ tenant: A, afterSeq: n - 5 });
    await c.until("live", () => c.log.includes(`live(${n})`), 20_000);
    assert.deepEqual(
      c.events,
      Array.from({ length: 5 }, (_, i) => `${A}:${n - 4 + i}`),
    );
    assert.equal(c.subscription.stats.gapsRepaired, 0);
  });

  it("afterSeq 'latest' starts at the tenant's last seq and delivers what follows", async () => {
    const n = workload.expectedFor(A).length;
    const c = sub({ tenant: A, afterSeq: "latest" });
    await c.until("live", () => c.log.includes(`live(${n})`), 20_000);
    await workload.createTask(A, null, "after latest");
    await c.untilEvents(1, 20_000);
    assert.deepEqual(c.log, [`live(${n})`, `${A}:${n + 1}`]);
  });

  it("toJSON gives exactly what `walcast tail` prints (proto3 JSON mapping)", async () => {
    const n = workload.expectedFor(A).length;
    const c = sub({ tenant: A });
    await c.untilEvents(n, 20_000);
    const { stdout } = await execFileAsync(walcastBin(), ["tail", "--tenant", A], {
      env: { ...process.env, ...walcast.env },
      timeout: 20_000,
      maxBuffer: 64 * 1024 * 1024,
    });
    // The proto3 JSON mapping writes timestamps Z-normalized
    // ("2025-01-02T03:04:05.678Z"); `walcast tail` (pbjson) writes "+00:00"
    // for the same instant. Compare the instants, everything else exactly.
    let offsets = 0;
    const zulu = (text: string) =>
      text.replace(/^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\+00:00$/, (_, t: string) => {
        offsets++;
        return `${t}Z`;
      });
    const tail = stdout
      .split("\n")
      .filter((line) => line.trim() !== "")
      .map((line) => JSON.parse(line, (_key, value: unknown) => (typeof value === "string" ? zulu(value) : value)) as unknown);
    if (offsets > 0) {
      console.log(`NOTE: walcast tail printed ${offsets} timestamps as "+00:00", not the proto3 JSON mapping's "Z"`);
    }
    const ours = c.items.flatMap((i) => (i.type === "event" ? [toJSON(i.event)] : []));
    assert.equal(tail.length, ours.length);
    assert.deepEqual(ours, tail);
  });

  it("a position past the tenant's last seq is rejected as 'ahead'", async () => {
    const c = sub({ tenant: B, afterSeq: 1_000_000 });
    await c.until("the end", () => c.done, 20_000);
    assert.ok(c.error instanceof CatchupError, String(c.error));
    assert.equal(c.error.reason, "ahead");
  });
});
