// toJSON is the proto3 JSON mapping (what gateways send to browsers).
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { create, fromJson } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";

import { Action, ChangeEventSchema, Entity } from "../../src/gen/walcast/v1/events_pb.js";
import { toJSON } from "../../src/json.js";

describe("toJSON", () => {
  const event = create(ChangeEventSchema, {
    eventId: "0000000001A2B3C4-00000000",
    tenantId: "acme",
    seq: 42n,
    entity: Entity.TASK,
    action: Action.COMPLETED,
    entityId: "9f1c",
    commitLsn: 27439044n,
    commitTime: timestampFromDate(new Date("2025-01-02T03:04:05.678Z")),
    xid: 7n,
    changedFields: ["status", "completed_at"],
    after: { case: "task", value: { id: "9f1c", tenantId: "acme", title: "Ship", status: "done", priority: 2, version: 3n } },
    extra: { color: "red" },
  });

  it("uses camelCase names, enum names, strings for 64-bit ints, RFC 3339 timestamps", () => {
    assert.deepEqual(toJSON(event), {
      eventId: "0000000001A2B3C4-00000000",
      tenantId: "acme",
      seq: "42",
      entity: "ENTITY_TASK",
      action: "ACTION_COMPLETED",
      entityId: "9f1c",
      commitLsn: "27439044",
      commitTime: "2025-01-02T03:04:05.678Z",
      xid: "7",
      changedFields: ["status", "completed_at"],
      task: { id: "9f1c", tenantId: "acme", title: "Ship", status: "done", priority: 2, version: "3" },
      extra: { color: "red" },
    });
  });

  it("round-trips through fromJson", () => {
    assert.deepEqual(fromJson(ChangeEventSchema, toJSON(event)), event);
  });

  it("can keep zero values", () => {
    assert.equal(toJSON(event, { alwaysEmitImplicit: true }).txIndex, 0);
  });
});
