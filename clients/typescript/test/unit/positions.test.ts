// Dedup and gap detection rules, without any I/O.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { Positions } from "../../src/positions.js";

const ev = (tenantId: string, seq: number, eventId = `${tenantId}-${seq}`) => ({ tenantId, seq: BigInt(seq), eventId });

describe("Positions", () => {
  it("delivers 1, 2, 3 in order from position 0", () => {
    const p = new Positions(100, 0n);
    for (const seq of [1, 2, 3]) {
      assert.deepEqual(p.judge(ev("a", seq)), { kind: "deliver" });
      p.accept(ev("a", seq));
    }
    assert.equal(p.position("a"), 3n);
  });

  it("drops a repeated event_id even with a new seq", () => {
    const p = new Positions(100, 0n);
    p.accept(ev("a", 1, "x"));
    assert.deepEqual(p.judge(ev("a", 2, "x")), { kind: "duplicate", by: "event_id" });
  });

  it("drops a seq at or below the position (by seq once the id left the window)", () => {
    const p = new Positions(2, 0n);
    for (const seq of [1, 2, 3]) {
      p.accept(ev("a", seq));
    }
    // "a-1" was evicted from the 2-entry window; the seq rule still catches it.
    assert.deepEqual(p.judge(ev("a", 1)), { kind: "duplicate", by: "seq" });
    assert.deepEqual(p.judge(ev("a", 3)), { kind: "duplicate", by: "event_id" });
  });

  it("reports a gap with the last delivered seq", () => {
    const p = new Positions(100, 0n);
    p.accept(ev("a", 1));
    assert.deepEqual(p.judge(ev("a", 4)), { kind: "gap", after: 1n });
    // Judging does not move anything.
    assert.equal(p.position("a"), 1n);
  });

  it("a first event other than seq 1 is a gap when starting from 0", () => {
    const p = new Positions(100, 0n);
    assert.deepEqual(p.judge(ev("a", 5)), { kind: "gap", after: 0n });
  });

  it("takes the first event as baseline when there is no starting point", () => {
    const p = new Positions(100, undefined);
    assert.deepEqual(p.judge(ev("a", 57)), { kind: "deliver" });
    p.accept(ev("a", 57));
    assert.deepEqual(p.judge(ev("a", 59)), { kind: "gap", after: 57n });
  });

  it("keeps tenants apart", () => {
    const p = new Positions(100, 0n, new Map([["b", 10n]]));
    p.accept(ev("a", 1));
    assert.deepEqual(p.judge(ev("b", 11)), { kind: "deliver" });
    assert.deepEqual(p.judge(ev("b", 2)), { kind: "duplicate", by: "seq" });
    assert.deepEqual(p.judge(ev("a", 2)), { kind: "deliver" });
  });

  it("skipTo moves forward only (re-sync)", () => {
    const p = new Positions(100, 0n);
    p.skipTo("a", 9n);
    assert.deepEqual(p.judge(ev("a", 10)), { kind: "deliver" });
    p.skipTo("a", 3n);
    assert.equal(p.position("a"), 9n);
  });
});
