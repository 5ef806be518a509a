/**
 * `@walcast/client`: subscribe to walcast's per-tenant change stream.
 *
 * ```ts
 * import { subscribe } from "@walcast/client";
 * for await (const item of subscribe({ tenant: "acme", afterSeq: 0 })) { ... }
 * ```
 *
 * Everything public is exported here; other modules are internal.
 *
 * @module
 */

export { loadAndFollow, subscribe } from "./subscribe.js";
export type { LoadHandlers, Subscription, SubscriptionHandlers } from "./subscribe.js";
export { ALL_TENANTS } from "./options.js";
export type { AfterSeq, LoadOptions, Logger, SubscribeOptions } from "./options.js";
export type {
  EventItem,
  LiveItem,
  LoadItem,
  ResyncItem,
  SnapshotItem,
  SubscriptionItem,
  SubscriptionStats,
} from "./items.js";
export { CatchupError, GapError, StateNotReadyError, WalcastError } from "./errors.js";
export type { CatchupRejection, WalcastErrorCode } from "./errors.js";
export { toJSON } from "./json.js";

// The generated event types (from proto/walcast/v1/events.proto).
export { Action, ChangeEventSchema, Entity } from "./gen/walcast/v1/events_pb.js";
export type {
  Actor,
  ActorJson,
  ChangeEvent,
  ChangeEventJson,
  EditingLock,
  EditingLockJson,
  Project,
  ProjectJson,
  Task,
  TaskJson,
} from "./gen/walcast/v1/events_pb.js";
