/**
 * Options of `subscribe()`, their documented defaults, and validation.
 *
 * @module
 */

import type { NatsConnection } from "@nats-io/nats-core";
import type { NodeConnectionOptions } from "@nats-io/transport-node";

import { WalcastError } from "./errors.js";

/** The `tenant` value that subscribes to every tenant. */
export const ALL_TENANTS = "*";

/** Tenant ids walcast routes (SPEC §3); anything else is a dead letter. */
const TENANT_ID = /^[A-Za-z0-9_-]{1,128}$/;

/** Where a subscription to one tenant starts. */
export type AfterSeq = bigint | number | "latest";

/** Receives the subscription's diagnostics; `console` fits. */
export interface Logger {
  warn(message: string): void;
  info(message: string): void;
}

/** Options of {@link subscribe}. Only `tenant` is required. */
export interface SubscribeOptions {
  /**
   * The tenant id to follow (`[A-Za-z0-9_-]{1,128}`), or `"*"`
   * ({@link ALL_TENANTS}) for every tenant. Dead letters and TRUNCATE
   * events are never delivered.
   */
  tenant: string;

  /**
   * One tenant: deliver the events whose `seq` is greater than this.
   * Default `0` (everything the stream still holds, from `seq` 1).
   * `"latest"`: only events published from now on.
   * All tenants: only `0` (from the stream's first message) or `"latest"`;
   * use {@link positions} to resume.
   */
  afterSeq?: AfterSeq;

  /**
   * All tenants only: the last `seq` already processed per tenant. The
   * subscription starts at the earliest point any of them needs (asking the
   * catch-up service for each) and drops what each tenant has already seen.
   * Tenants not listed are delivered from that point on. Default: none.
   */
  positions?: Readonly<Record<string, bigint | number>>;

  /**
   * An open NATS connection to use. It is shared, not owned: `close()` leaves
   * it open. Default: the subscription opens (and owns) its own connection to
   * {@link servers}.
   */
  connection?: NatsConnection;

  /**
   * NATS server URL(s) when no {@link connection} is given.
   * Default `"nats://127.0.0.1:4222"`.
   */
  servers?: string | string[];

  /**
   * Extra options for the owned connection (credentials, TLS, name, ...).
   * Unless set here, `maxReconnectAttempts` is `-1`: the subscription waits
   * for the server forever, also for the first connection. Default: none.
   */
  connectOptions?: Partial<NodeConnectionOptions>;

  /** walcast's `--subject-prefix`. Default `"walcast"`. */
  subjectPrefix?: string;

  /**
   * walcast's `--stream`, used by all-tenants subscriptions (a one-tenant
   * subscription takes the stream name from the catch-up service).
   * Default `"WALCAST"`.
   */
  stream?: string;

  /**
   * How many recent `event_id`s are remembered to drop duplicates.
   * Default `10000`.
   */
  dedupWindow?: number;

  /** Timeout of one catch-up request, in ms. Default `2000`. */
  requestTimeout?: number;

  /**
   * How long a gap repair may wait for the missing events, in ms, before the
   * subscription fails with a `GapError`. Default `15000`.
   */
  repairTimeout?: number;

  /**
   * Longest wait between two retries (catch-up service unavailable, stream
   * consumer lost), in ms. Retries back off exponentially from 100 ms with
   * jitter. Default `5000`.
   */
  maxBackoff?: number;

  /** Receives warnings (retries, repairs) and info lines. Default: silent. */
  logger?: Logger;
}

/**
 * Options of {@link loadAndFollow}: those of a one-tenant subscription (it
 * starts where the snapshot ends, so no `afterSeq`), plus where the state is.
 */
export interface LoadOptions extends Omit<SubscribeOptions, "afterSeq" | "positions"> {
  /** The tenant id to load and follow (`[A-Za-z0-9_-]{1,128}`; not `"*"`). */
  tenant: string;

  /**
   * walcast's state bucket (`--state-bucket`). Default `<stream>_STATE`,
   * i.e. `"WALCAST_STATE"`.
   */
  stateBucket?: string;

  /**
   * How long to wait, in ms, for the state to be ready (walcast's backfill
   * marker `complete`: a first start or a purged bucket is being filled)
   * before failing with a `StateNotReadyError`. Default `30000`.
   */
  stateReadyTimeout?: number;
}

/** {@link SubscribeOptions} after defaults and validation. */
export interface Settings {
  tenant: string | undefined;
  afterSeq: bigint | "latest";
  positions: Map<string, bigint>;
  connection: NatsConnection | undefined;
  servers: string | string[];
  connectOptions: Partial<NodeConnectionOptions>;
  subjectPrefix: string;
  stream: string;
  dedupWindow: number;
  requestTimeout: number;
  repairTimeout: number;
  maxBackoff: number;
  logger: Logger;
  /** Set by {@link resolveLoadOptions}: load the snapshot first. */
  state: { bucket: string; readyTimeout: number } | undefined;
}

const SILENT: Logger = { warn() {}, info() {} };

function invalid(message: string): WalcastError {
  return new WalcastError("invalid_options", message);
}

function toSeq(value: bigint | number, what: string): bigint {
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw invalid(`${what} must be a non-negative integer, got ${value}`);
    }
    return BigInt(value);
  }
  if (typeof value !== "bigint" || value < 0n) {
    throw invalid(`${what} must be a non-negative integer, got ${String(value)}`);
  }
  return value;
}

function positiveMs(value: number | undefined, fallback: number, what: string): number {
  if (value === undefined) {
    return fallback;
  }
  if (!Number.isFinite(value) || value <= 0) {
    throw invalid(`${what} must be a positive number of milliseconds, got ${value}`);
  }
  return value;
}

/** True for a tenant id walcast can route (SPEC §3). */
export function isValidTenantId(tenant: string): boolean {
  return TENANT_ID.test(tenant);
}

/** Applies defaults and rejects invalid combinations with `invalid_options`. */
export function resolveOptions(options: SubscribeOptions): Settings {
  if (options === null || typeof options !== "object") {
    throw invalid("subscribe() needs an options object with at least `tenant`");
  }
  const all = options.tenant === ALL_TENANTS;
  if (!all && (typeof options.tenant !== "string" || !isValidTenantId(options.tenant))) {
    throw invalid(
      `tenant must match [A-Za-z0-9_-]{1,128} or be "*" for all tenants, got ${JSON.stringify(options.tenant)}`,
    );
  }
  const raw = options.afterSeq ?? 0n;
  const afterSeq = raw === "latest" ? "latest" : toSeq(raw, "afterSeq");
  if (all && afterSeq !== "latest" && afterSeq !== 0n) {
    throw invalid('an all-tenants subscription takes afterSeq 0 or "latest"; resume it with `positions`');
  }
  const positions = new Map<string, bigint>();
  if (options.positions !== undefined) {
    if (!all) {
      throw invalid("`positions` is for all-tenants subscriptions; use afterSeq for one tenant");
    }
    if (afterSeq === "latest") {
      throw invalid('`positions` and afterSeq "latest" exclude each other');
    }
    for (const [tenant, seq] of Object.entries(options.positions)) {
      if (!isValidTenantId(tenant)) {
        throw invalid(`positions: invalid tenant id ${JSON.stringify(tenant)}`);
      }
      positions.set(tenant, toSeq(seq, `positions[${tenant}]`));
    }
  }
  const subjectPrefix = options.subjectPrefix ?? "walcast";
  if (!/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(subjectPrefix)) {
    throw invalid(`subjectPrefix must be a NATS subject without wildcards, got ${JSON.stringify(subjectPrefix)}`);
  }
  const dedupWindow = options.dedupWindow ?? 10_000;
  if (!Number.isSafeInteger(dedupWindow) || dedupWindow < 1) {
    throw invalid(`dedupWindow must be a positive integer, got ${dedupWindow}`);
  }
  return {
    tenant: all ? undefined : options.tenant,
    afterSeq,
    positions,
    connection: options.connection,
    servers: options.servers ?? "nats://127.0.0.1:4222",
    connectOptions: options.connectOptions ?? {},
    subjectPrefix,
    stream: options.stream ?? "WALCAST",
    dedupWindow,
    requestTimeout: positiveMs(options.requestTimeout, 2_000, "requestTimeout"),
    repairTimeout: positiveMs(options.repairTimeout, 15_000, "repairTimeout"),
    maxBackoff: positiveMs(options.maxBackoff, 5_000, "maxBackoff"),
    logger: options.logger ?? SILENT,
    state: undefined,
  };
}

/** {@link resolveOptions} for {@link LoadOptions}. */
export function resolveLoadOptions(options: LoadOptions): Settings {
  if (options === null || typeof options !== "object") {
    throw invalid("loadAndFollow() needs an options object with at least `tenant`");
  }
  if (options.tenant === ALL_TENANTS) {
    throw invalid("loadAndFollow() loads one tenant; `tenant` cannot be \"*\"");
  }
  const extra = options as LoadOptions & { afterSeq?: unknown; positions?: unknown };
  if (extra.afterSeq !== undefined || extra.positions !== undefined) {
    throw invalid("loadAndFollow() starts where its snapshot ends: no afterSeq or positions");
  }
  const { stateBucket, stateReadyTimeout, ...subscribeOptions } = options;
  const settings = resolveOptions(subscribeOptions);
  const bucket = stateBucket ?? `${settings.stream}_STATE`;
  if (!/^[-\w]+$/.test(bucket)) {
    throw invalid(`stateBucket must be a bucket name ([-A-Za-z0-9_]+), got ${JSON.stringify(bucket)}`);
  }
  return {
    ...settings,
    state: { bucket, readyTimeout: positiveMs(stateReadyTimeout, 30_000, "stateReadyTimeout") },
  };
}
