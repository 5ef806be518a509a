/**
 * Typed errors. Every error a subscription ends with is a {@link WalcastError}
 * whose `code` says what to do about it; `instanceof` works for the
 * subclasses that carry extra data.
 *
 * Transient trouble (NATS down, the catch-up service not answering yet, a
 * 5xx from it) is never an error: the subscription waits and retries with
 * capped exponential backoff. Only *definite* conditions end it.
 *
 * @module
 */

/** What went wrong, as a stable string for `switch` statements and logs. */
export type WalcastErrorCode =
  /** The options passed to `subscribe()` are invalid. */
  | "invalid_options"
  /** The catch-up service refused the request: `ahead` or `bad_request` (see {@link CatchupError}). */
  | "catchup_rejected"
  /** The catch-up service answered something that is not the SPEC §7 contract. */
  | "catchup_protocol"
  /** Events the stream must hold are missing and could not be repaired (see {@link GapError}). */
  | "gap"
  /** A stream message is not a `walcast.v1.ChangeEvent`, or its oversized body is gone. */
  | "decode"
  /** The NATS connection was closed (not by `close()`). */
  | "connection_closed"
  /** `loadAndFollow()`: the state bucket was not ready in time (see {@link StateNotReadyError}). */
  | "state_not_ready"
  /** A handler passed to `subscribe(options, handlers)` threw. */
  | "handler"
  /** Anything else (a bug, or a NATS failure this package does not know); see `cause`. */
  | "unexpected";

/** Base class of every error this package throws or ends a subscription with. */
export class WalcastError extends Error {
  /** Stable, machine-readable reason. */
  readonly code: WalcastErrorCode;

  constructor(code: WalcastErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "WalcastError";
    this.code = code;
  }
}

/** Error codes of the catch-up service that end a subscription. */
export type CatchupRejection = "ahead" | "bad_request";

/**
 * The catch-up service (SPEC §7) rejected a request for a definite reason:
 * `ahead` (the position asked for is past the tenant's last `seq`: the
 * client's position does not belong to this stream) or `bad_request`.
 * (`too_old` is not an error: it becomes a `resync` item.)
 */
export class CatchupError extends WalcastError {
  /** The service's error code. */
  readonly reason: CatchupRejection;
  /** The tenant the request was for. */
  readonly tenantId: string;
  /** The `after_seq` that was asked for. */
  readonly afterSeq: bigint;
  /** HTTP-like status from `Nats-Service-Error-Code` (416, 400), if sent. */
  readonly status: number | undefined;

  constructor(
    reason: CatchupRejection,
    tenantId: string,
    afterSeq: bigint,
    status: number | undefined,
    detail: string,
  ) {
    super(
      "catchup_rejected",
      `catch-up for tenant ${tenantId} after seq ${afterSeq} rejected: ${reason}${detail ? ` (${detail})` : ""}`,
    );
    this.name = "CatchupError";
    this.reason = reason;
    this.tenantId = tenantId;
    this.afterSeq = afterSeq;
    this.status = status;
  }
}

/**
 * Events the stream must hold are missing: the events from `expected` on
 * are not in the stream although later ones (and, per the catch-up service,
 * older ones) are. This breaks the stream's contract (SPEC §4); the
 * subscription stops rather than skip events silently.
 */
export class GapError extends WalcastError {
  readonly tenantId: string;
  /** The `seq` that should have come next. */
  readonly expected: bigint;
  /** The `seq` that came instead, when one did. */
  readonly got: bigint | undefined;

  constructor(tenantId: string, expected: bigint, got: bigint | undefined, detail: string) {
    super(
      "gap",
      `tenant ${tenantId}: expected seq ${expected}${got === undefined ? "" : `, got ${got}`}; ${detail}`,
    );
    this.name = "GapError";
    this.tenantId = tenantId;
    this.expected = expected;
    this.got = got;
  }
}

/**
 * `loadAndFollow()` waited `stateReadyTimeout` for the state bucket's
 * readiness marker (`_walcast.backfill`) to say `complete`: walcast is still
 * copying the tables (first start, purged bucket), is not running, or runs
 * with the state turned off. A snapshot is never given before the backfill is
 * complete, since it would miss pre-existing rows. Retry later.
 */
export class StateNotReadyError extends WalcastError {
  /** The bucket that was read. */
  readonly bucket: string;
  readonly tenantId: string;
  /** The marker's last `state` seen (`running`, `requested`); `undefined`: no marker, or no bucket. */
  readonly state: string | undefined;

  constructor(bucket: string, tenantId: string, state: string | undefined) {
    super("state_not_ready", `state bucket ${bucket} not ready for tenant ${tenantId} (backfill marker: ${state ?? "absent"})`);
    this.name = "StateNotReadyError";
    this.bucket = bucket;
    this.tenantId = tenantId;
    this.state = state;
  }
}
