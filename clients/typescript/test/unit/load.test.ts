// loadAndFollow() against a real nats-server and a fake walcast that writes
// the state bucket exactly as docs/STATE.md says (SPEC §8 "Loading").
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";

import { equals } from "@bufbuild/protobuf";

import { ChangeEventSchema, loadAndFollow, StateNotReadyError } from "../../src/index.js";
import type { ChangeEvent, LoadItem, LoadOptions, SnapshotItem, Subscription } from "../../src/index.js";
import { waitFor } from "../support/env.js";
import { FakeWalcast } from "../support/fake-walcast.js";
import { NatsServer } from "../support/nats.js";
import { applyEvent, Model, Rng, stateKey } from "../support/state-model.js";

let nats: NatsServer;
let fake: FakeWalcast;
const open: Subscription<LoadItem>[] = [];

/** How long any one expected item may take. */
const PATIENCE_MS = 20_000;

function load(options: Partial<LoadOptions> = {}): Subscription<LoadItem> {
  const subscription = loadAndFollow({
    servers: nats.url,
    tenant: "acme",
    requestTimeout: 1_000,
    maxBackoff: 300,
    logger: { warn: (m) => console.log(`WARN ${m}`), info: () => {} },
    ...options,
  });
  open.push(subscription);
  return subscription;
}

/** The next item, failing after PATIENCE_MS. */
async function next(iterator: AsyncIterator<LoadItem>, patience = PATIENCE_MS): Promise<LoadItem> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`nothing within ${patience} ms`)), patience);
  });
  try {
    const result = await Promise.race([iterator.next(), timeout]);
    assert.ok(!result.done, "the subscription ended");
    return result.value;
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves true if no item arrives within `ms` (a bounded wait for an absence). */
async function quiet(pending: Promise<IteratorResult<LoadItem>>, ms = 500): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const elapsed = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(true), ms);
  });
  const result = await Promise.race([pending.then(() => false), elapsed]);
  clearTimeout(timer);
  return result;
}

async function snapshot(iterator: AsyncIterator<LoadItem>): Promise<SnapshotItem> {
  const item = await next(iterator);
  assert.equal(item.type, "snapshot", "the snapshot comes first");
  return item as SnapshotItem;
}

/** Follows until `lastSeq`, checking each event is the next seq; the rows then. */
async function followUntil(
  iterator: AsyncIterator<LoadItem>,
  start: SnapshotItem,
  lastSeq: bigint,
): Promise<Map<string, ChangeEvent>> {
  const rows = new Map(start.rows);
  let seq = start.asOfSeq;
  while (seq < lastSeq) {
    const item = await next(iterator);
    if (item.type !== "event") {
      continue; // `live`
    }
    assert.equal(item.event.seq, seq + 1n, "events follow the snapshot in order, once");
    applyEvent(rows, stateKey(item.event), item.event);
    seq = item.event.seq;
  }
  return rows;
}

function assertSameRows(actual: ReadonlyMap<string, ChangeEvent>, expected: ReadonlyMap<string, ChangeEvent>): void {
  assert.deepEqual([...actual.keys()].sort(), [...expected.keys()].sort());
  for (const [key, event] of expected) {
    assert.ok(equals(ChangeEventSchema, actual.get(key) as ChangeEvent, event), `row ${key} differs`);
  }
}

beforeEach(async () => {
  nats = await NatsServer.start();
  fake = await FakeWalcast.start(nats.url);
  await fake.createBucket();
});

afterEach(async () => {
  await Promise.all(open.splice(0).map((s) => s.close()));
  await fake.close();
  await nats.destroy();
});

describe("loadAndFollow", () => {
  it("yields the rows as of the highest seq (delete markers included), then the events after it", async () => {
    await fake.setMarker("complete");
    const rng = new Rng(18);
    const acme = new Model("acme");
    const other = new Model("other");
    for (let i = 0; i < 5; i++) {
      const row = acme.backfilled();
      await fake.putRow(row.key, row.event, 0, i === 0);
    }
    for (let i = 0; i < 40; i++) {
      await fake.apply(acme.nextChange(rng), i % 10 === 3);
      await fake.apply(other.nextChange(rng));
    }
    const victim = [...acme.rows.keys()][0] as string;
    await fake.apply(acme.deleteRow(victim)); // the last change is a delete

    const iterator = load()[Symbol.asyncIterator]();
    const first = await snapshot(iterator);
    assert.equal(first.tenantId, "acme");
    assert.equal(first.asOfSeq, 41n);
    assert.equal(first.as_of_seq, 41n, "SPEC §8's name too");
    assert.ok(!first.rows.has(victim));
    assertSameRows(first.rows, acme.rows);

    for (let i = 0; i < 10; i++) {
      await fake.apply(acme.nextChange(rng), i === 4);
    }
    assertSameRows(await followUntil(iterator, first, acme.seq), acme.rows);
  });

  it("loads during writes: each snapshot plus the events that follow gives the rows", async () => {
    await fake.setMarker("complete");
    const seed = Math.floor(Math.random() * 2 ** 32);
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const acme = new Model("acme");
    const other = new Model("other");
    for (let i = 0; i < 20; i++) {
      const row = acme.backfilled();
      await fake.putRow(row.key, row.event, 0);
    }
    const changes = 600n;
    const moments = Array.from({ length: 6 }, () => BigInt(rng.below(Number(changes)))).sort((a, b) =>
      a < b ? -1 : a > b ? 1 : 0,
    );
    const loads: Promise<{ moment: bigint; asOf: bigint; rows: Map<string, ChangeEvent> }>[] = [];
    for (let i = 0n; i < changes; i++) {
      const change = acme.nextChange(rng);
      await fake.apply(change, i % 50n === 7n);
      if (rng.next() < 0.3) {
        await fake.apply(other.nextChange(rng));
      }
      while (moments[0] !== undefined && moments[0] <= change.event.seq) {
        const moment = moments.shift() as bigint;
        const iterator = load()[Symbol.asyncIterator]();
        loads.push(
          (async () => {
            const first = await snapshot(iterator);
            const rows = await followUntil(iterator, first, changes);
            return { moment, asOf: first.asOfSeq, rows };
          })(),
        );
      }
    }
    for (const { moment, asOf, rows } of await Promise.all(loads)) {
      console.log(`load started after seq ${moment}: as of ${asOf}, ${rows.size} rows at the end`);
      assert.ok(asOf >= moment, "a load reflects at least what was applied before it");
      assertSameRows(rows, acme.rows);
    }
  });

  it("waits while the marker is absent or running, then loads", async () => {
    const acme = new Model("acme");
    const row = acme.backfilled();
    await fake.putRow(row.key, row.event, 0);
    const iterator = load()[Symbol.asyncIterator]();
    const pending = iterator.next();
    assert.ok(await quiet(pending), "nothing while there is no marker");
    await fake.setMarker("running");
    assert.ok(await quiet(pending), "nothing while the backfill runs");
    const late = acme.backfilled();
    await fake.putRow(late.key, late.event, 0);
    await fake.setMarker("complete");
    const result = await pending;
    assert.ok(!result.done && result.value.type === "snapshot");
    assert.equal(result.value.asOfSeq, 0n);
    assert.equal(result.value.rows.size, 2);
    assertSameRows(result.value.rows, acme.rows);
  });

  it("ends with a StateNotReadyError after stateReadyTimeout", async () => {
    await fake.setMarker("running");
    const subscription = load({ stateReadyTimeout: 300 });
    const iterator = subscription[Symbol.asyncIterator]();
    await assert.rejects(next(iterator), (err: unknown) => {
      assert.ok(err instanceof StateNotReadyError, String(err));
      assert.equal(err.code, "state_not_ready");
      assert.equal(err.bucket, "WALCAST_STATE");
      assert.equal(err.tenantId, "acme");
      assert.equal(err.state, "running");
      return true;
    });
    assert.ok((await subscription.closed()) instanceof StateNotReadyError);

    const elsewhere = load({ stateReadyTimeout: 300, stateBucket: "NOPE_STATE" })[Symbol.asyncIterator]();
    await assert.rejects(next(elsewhere), (err: unknown) => err instanceof StateNotReadyError && err.state === undefined);
  });

  it("loads an empty tenant as of 0, then its first events", async () => {
    await fake.setMarker("complete");
    const rng = new Rng(7);
    const other = new Model("other");
    for (let i = 0; i < 5; i++) {
      await fake.apply(other.nextChange(rng));
    }
    const iterator = load()[Symbol.asyncIterator]();
    const first = await snapshot(iterator);
    assert.equal(first.asOfSeq, 0n);
    assert.equal(first.rows.size, 0);
    const acme = new Model("acme");
    for (let i = 0; i < 3; i++) {
      await fake.apply(acme.nextChange(rng));
    }
    assertSameRows(await followUntil(iterator, first, 3n), acme.rows);
  });

  it("calls onSnapshot first in callback mode, and validates its options", async () => {
    await fake.setMarker("complete");
    const acme = new Model("acme");
    const row = acme.backfilled();
    await fake.putRow(row.key, row.event, 0);
    const seen: string[] = [];
    const arrived = async (count: number): Promise<void> => {
      await waitFor(`${count} callbacks (have ${seen.join(" ")})`, () => seen.length >= count, PATIENCE_MS);
    };
    const subscription = loadAndFollow(
      { servers: nats.url, tenant: "acme" },
      {
        onSnapshot: (item) => {
          seen.push(`snapshot(${item.asOfSeq}, ${item.rows.size})`);
        },
        onEvent: (event) => {
          seen.push(`event(${event.seq})`);
        },
        onError: (err) => seen.push(`error(${err.code})`),
      },
    );
    open.push(subscription);
    await arrived(1);
    await fake.apply(acme.nextChange(new Rng(1)));
    await arrived(2);
    assert.deepEqual(seen, ["snapshot(0, 1)", "event(1)"]);
    assert.throws(() => loadAndFollow({ tenant: "*" }), /one tenant/);
    assert.throws(() => loadAndFollow({ tenant: "acme", afterSeq: 3 } as LoadOptions), /no afterSeq/);
  });

  it("loads a tenant with 10,000 rows", async () => {
    await fake.setMarker("complete");
    const rng = new Rng(10_000);
    const acme = new Model("acme");
    const written = Date.now();
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 9_000; i++) {
      const row = acme.backfilled();
      writes.push(fake.putRow(row.key, row.event, 0));
    }
    await Promise.all(writes);
    while (acme.rows.size < 10_000) {
      await fake.apply(acme.nextChange(rng));
    }
    console.log(`wrote 10,000 rows in ${Date.now() - written} ms`);
    const started = Date.now();
    const first = await snapshot(load()[Symbol.asyncIterator]());
    console.log(`loaded ${first.rows.size} rows as of seq ${first.asOfSeq} in ${Date.now() - started} ms`);
    assert.equal(first.asOfSeq, acme.seq);
    assertSameRows(first.rows, acme.rows);
  });
});
