/**
 * The proto3 JSON mapping of `ChangeEvent` — the documented form for
 * gateways that forward events to browsers (SPEC §7): lowerCamelCase field
 * names, enums by name (`"ACTION_COMPLETED"`), 64-bit integers as decimal
 * strings (`"seq": "42"`), timestamps as RFC 3339 strings, unset optional
 * fields and default values left out.
 *
 * @module
 */

import type { JsonWriteOptions } from "@bufbuild/protobuf";
import { toJson } from "@bufbuild/protobuf";

import type { ChangeEvent, ChangeEventJson } from "./gen/walcast/v1/events_pb.js";
import { ChangeEventSchema } from "./gen/walcast/v1/events_pb.js";

/**
 * `event` in the proto3 JSON mapping, ready for `JSON.stringify`.
 * `options` are protobuf-es' (e.g. `{ alwaysEmitImplicit: true }` to keep
 * zero values such as `"txIndex": 0`).
 */
export function toJSON(event: ChangeEvent, options?: Partial<JsonWriteOptions>): ChangeEventJson {
  return toJson(ChangeEventSchema, event, options) as ChangeEventJson;
}
