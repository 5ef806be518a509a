// The fast ChangeEvent decoder (src/decode.ts) against protobuf-es' own
// fromBinary: the same objects for every shape walcast sends, and the
// fallback for everything else.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { create, equals, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { MessageInitShape } from "@bufbuild/protobuf";

import { decodeChangeEvent, decodeFast } from "../../src/decode.js";
import {
  type Action,
  ActorSchema,
  ChangeEventSchema,
  EditingLockSchema,
  type Entity,
  ProjectSchema,
  TaskSchema,
} from "../../src/gen/walcast/v1/events_pb.js";

/** A small seeded PRNG (mulberry32), so a failure reproduces. */
function rng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const TEXTS = ["", "a", "todo", "Ünïcødé ✓", "emoji 🎉 in text", "x".repeat(63), "y".repeat(64), "z".repeat(65), "é".repeat(200), '{"board": 1}', "line\nbreak\u0000nul"];
const BIG = [0n, 1n, 127n, 128n, 2n ** 31n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];
const SIGNED = [0n, 1n, -1n, 2n ** 53n, -(2n ** 53n), 2n ** 63n - 1n, -(2n ** 63n)];

function randomEvent(next: () => number): MessageInitShape<typeof ChangeEventSchema> {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(next() * xs.length)]!;
  const maybe = <T>(x: T): T | undefined => (next() < 0.5 ? x : undefined);
  const text = () => pick(TEXTS);
  const ts = () => maybe({ seconds: pick(SIGNED) / 2n ** 30n, nanos: Math.floor(next() * 1e9) });
  const task = () =>
    create(TaskSchema, {
      id: text(), tenantId: text(), projectId: maybe(text()), title: text(), description: maybe(text()),
      status: text(), priority: maybe(pick([0, 3, -7, 2 ** 31 - 1, -(2 ** 31)])), assignee: maybe(text()),
      dueAt: ts(), completedAt: ts(), version: pick(SIGNED), createdAt: ts(), updatedAt: ts(),
      updatedBy: maybe(text()), actorType: maybe(text()), clientId: maybe(text()), metadata: maybe(text()),
    });
  const project = () =>
    create(ProjectSchema, {
      id: text(), tenantId: text(), name: text(), description: maybe(text()), status: text(), version: pick(SIGNED),
      createdAt: ts(), updatedAt: ts(), updatedBy: maybe(text()), actorType: maybe(text()), clientId: maybe(text()),
      metadata: maybe(text()),
    });
  const lock = () =>
    create(EditingLockSchema, { tenantId: text(), recordType: text(), recordId: text(), lockedBy: text(), lockedAt: ts(), expiresAt: ts() });
  const row = pick(["task", "project", "lock", "none"] as const);
  const after = row === "task" ? { case: "task" as const, value: task() } : row === "project" ? { case: "project" as const, value: project() } : row === "lock" ? { case: "lock" as const, value: lock() } : undefined;
  const brow = pick(["task", "project", "lock", "none"] as const);
  const before = brow === "task" ? { case: "taskBefore" as const, value: task() } : brow === "project" ? { case: "projectBefore" as const, value: project() } : brow === "lock" ? { case: "lockBefore" as const, value: lock() } : undefined;
  const extra: Record<string, string> = {};
  for (let i = Math.floor(next() * 3); i > 0; i--) {
    extra[text()] = text();
  }
  return {
    eventId: text(), tenantId: text(), seq: pick(BIG), entity: pick([0, 1, 2, 3, 42]) as Entity, action: pick([0, 5, 11, 99]) as Action,
    entityId: text(), commitLsn: pick(BIG), commitTime: ts(), xid: pick(BIG), txIndex: pick([0, 1, 2 ** 32 - 1]),
    actor: maybe(create(ActorSchema, { actorType: maybe(text()), actorId: maybe(text()), clientId: maybe(text()) })),
    changedFields: Array.from({ length: Math.floor(next() * 4) }, text), unchangedFields: Array.from({ length: Math.floor(next() * 3) }, text),
    table: text(), extra,
    ...(after ? { after } : {}),
    ...(before ? { before } : {}),
  };
}

describe("decodeChangeEvent", () => {
  it("gives fromBinary's object for 2,000 random events, on the fast path", () => {
    const next = rng(21);
    for (let i = 0; i < 2_000; i++) {
      const bytes = toBinary(ChangeEventSchema, create(ChangeEventSchema, randomEvent(next)));
      const expected = fromBinary(ChangeEventSchema, bytes);
      const fast = decodeFast(bytes);
      assert.ok(fast !== undefined, `event ${i} left the fast path`);
      assert.deepStrictEqual(fast, expected, `event ${i}`);
      assert.ok(equals(ChangeEventSchema, fast, expected));
    }
  });

  it("leaves an unknown field to fromBinary, which keeps it", () => {
    const known = toBinary(ChangeEventSchema, create(ChangeEventSchema, { seq: 7n, tenantId: "acme" }));
    const bytes = new Uint8Array([...known, 0x98, 0x06, 1]); // field 99 (tag 792 as a varint), value 1
    assert.equal(decodeFast(bytes), undefined);
    assert.deepStrictEqual(decodeChangeEvent(bytes), fromBinary(ChangeEventSchema, bytes));
  });

  it("leaves a repeated message field to fromBinary, which merges it", () => {
    const one = toBinary(ChangeEventSchema, create(ChangeEventSchema, { actor: { actorId: "a" } }));
    const two = toBinary(ChangeEventSchema, create(ChangeEventSchema, { actor: { clientId: "c" } }));
    const bytes = new Uint8Array([...one, ...two]);
    assert.equal(decodeFast(bytes), undefined);
    const event = decodeChangeEvent(bytes);
    assert.equal(event.actor?.actorId, "a");
    assert.equal(event.actor?.clientId, "c");
  });

  it("rejects what fromBinary rejects: truncated bytes, invalid UTF-8", () => {
    const bytes = toBinary(ChangeEventSchema, create(ChangeEventSchema, { eventId: "abcdef", seq: 300n }));
    const truncated = bytes.subarray(0, bytes.length - 2);
    assert.throws(() => fromBinary(ChangeEventSchema, truncated));
    assert.throws(() => decodeChangeEvent(truncated));
    const invalid = new Uint8Array([(1 << 3) | 2, 2, 0xc3, 0x28]); // event_id: a broken 2-byte sequence
    assert.throws(() => fromBinary(ChangeEventSchema, invalid));
    assert.throws(() => decodeChangeEvent(invalid));
  });
});
