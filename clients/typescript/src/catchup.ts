/**
 * The catch-up service client (SPEC §7): "tenant T after seq N" → where in
 * the stream that tenant's event N+1 is.
 *
 * One function decides what is transient (retry) and what is definite (stop
 * or re-sync): {@link classify}. Callers only see a plan, a `too_old` answer,
 * or a definite error.
 *
 * @module
 */

import type { Msg, NatsConnection } from "@nats-io/nats-core";

import { CatchupError, WalcastError } from "./errors.js";

/** Where to read a tenant's events from. */
export interface CatchupPlan {
  readonly kind: "plan";
  /** The stream to read. */
  readonly stream: string;
  /** Filter subject of the tenant, e.g. `walcast.acme.>`. */
  readonly filterSubject: string;
  /** Stream sequence of the event `afterSeq + 1` (or the stream's next one). */
  readonly startStreamSeq: number;
  /** The tenant's highest published `seq` (0 if none) at answer time. */
  readonly lastSeq: bigint;
}

/** The events after `afterSeq` are partly gone; the oldest one left is `oldestSeq`. */
export interface CatchupTooOld {
  readonly kind: "too_old";
  readonly oldestSeq: bigint;
}

export type CatchupAnswer = CatchupPlan | CatchupTooOld;

/** A failure worth retrying (service not up, timeout, 5xx). */
export class TransientCatchupFailure extends Error {
  override readonly name = "TransientCatchupFailure";
}

const textDecoder = new TextDecoder();

/**
 * `<prefix>-api.v1.catchup.<tenant>`: the tenant-scoped subject (SPEC §7),
 * the one a tenant user issued by walcast's auth callout may request (§9).
 */
export function catchupSubject(subjectPrefix: string, tenant: string): string {
  return `${subjectPrefix}-api.v1.catchup.${tenant}`;
}

/**
 * One catch-up request. Resolves with a plan or `too_old`; rejects with a
 * {@link TransientCatchupFailure} (retry later) or a definite
 * {@link WalcastError}.
 */
export async function requestCatchup(
  nc: NatsConnection,
  subject: string,
  tenant: string,
  afterSeq: bigint,
  timeout: number,
): Promise<CatchupAnswer> {
  // bigint is not JSON-serialisable; a decimal literal is exact at any size.
  const body = `{"tenant_id":${JSON.stringify(tenant)},"after_seq":${afterSeq.toString()}}`;
  let reply: Msg;
  try {
    reply = await nc.request(subject, body, { timeout });
  } catch (err) {
    throw classify(err, subject);
  }
  return parseReply(reply, tenant, afterSeq);
}

/**
 * Decides whether a request error is transient. Matches on error names, not
 * classes, so a connection made with another copy of the NATS client works.
 */
function classify(err: unknown, subject: string): Error {
  const name = err instanceof Error ? err.name : "";
  const cause = err instanceof Error && err.cause instanceof Error ? err.cause.name : "";
  const message = err instanceof Error ? err.message : String(err);
  if (name === "ClosedConnectionError") {
    return new WalcastError("connection_closed", "NATS connection closed", { cause: err });
  }
  const noResponders =
    ["NoResponders", "NoRespondersError"].includes(name) ||
    ["NoResponders", "NoRespondersError"].includes(cause) ||
    (err as { isNoResponders?: () => boolean } | null)?.isNoResponders?.() === true;
  if (noResponders) {
    return new TransientCatchupFailure(`no catch-up service answers on ${subject} (is walcast running?)`, {
      cause: err,
    });
  }
  // Timeouts, disconnects, draining and the like: all pass.
  return new TransientCatchupFailure(`catch-up request on ${subject} failed: ${message}`, { cause: err });
}

function protocolError(detail: string, tenant: string, afterSeq: bigint): WalcastError {
  return new WalcastError(
    "catchup_protocol",
    `catch-up reply for tenant ${tenant} after seq ${afterSeq} is not the SPEC §7 contract: ${detail}`,
  );
}

function seqField(value: unknown, name: string, tenant: string, afterSeq: bigint): bigint {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0) {
    throw protocolError(`${name} is ${JSON.stringify(value)}`, tenant, afterSeq);
  }
  return BigInt(value);
}

/** Parses a reply: success body, or micro error headers + `{"error": ...}`. */
export function parseReply(reply: Msg, tenant: string, afterSeq: bigint): CatchupAnswer {
  const headerCode = reply.headers?.get("Nats-Service-Error-Code") ?? "";
  const headerText = reply.headers?.get("Nats-Service-Error") ?? "";
  const text = textDecoder.decode(reply.data);
  let body: Record<string, unknown> = {};
  if (text.trim() !== "") {
    try {
      const parsed: unknown = JSON.parse(text);
      if (parsed !== null && typeof parsed === "object" && !Array.isArray(parsed)) {
        body = parsed as Record<string, unknown>;
      } else {
        throw new Error("not an object");
      }
    } catch {
      if (headerCode === "") {
        throw protocolError(`body is not a JSON object: ${text.slice(0, 200)}`, tenant, afterSeq);
      }
    }
  }
  const errorCode = typeof body["error"] === "string" ? body["error"] : "";
  if (headerCode !== "" || errorCode !== "") {
    const status = headerCode === "" ? undefined : Number(headerCode);
    const code = errorCode || (status === 410 ? "too_old" : status === 416 ? "ahead" : status === 400 ? "bad_request" : "");
    const detail = headerText || (typeof body["message"] === "string" ? body["message"] : "");
    switch (code) {
      case "too_old":
        return { kind: "too_old", oldestSeq: seqField(body["oldest_seq"], "oldest_seq", tenant, afterSeq) };
      case "ahead":
      case "bad_request":
        throw new CatchupError(code, tenant, afterSeq, status, detail);
      default:
        // 5xx or a code this client does not know yet: the service is there
        // but cannot answer now. Retrying is the safe choice.
        throw new TransientCatchupFailure(
          `catch-up service error ${headerCode || "?"} ${code || ""} ${detail}`.replace(/\s+/g, " ").trim(),
        );
    }
  }
  const stream = body["stream"];
  const filterSubject = body["filter_subject"];
  const start = body["start_stream_seq"];
  if (typeof stream !== "string" || stream === "") {
    throw protocolError(`stream is ${JSON.stringify(stream)}`, tenant, afterSeq);
  }
  if (typeof filterSubject !== "string" || filterSubject === "") {
    throw protocolError(`filter_subject is ${JSON.stringify(filterSubject)}`, tenant, afterSeq);
  }
  if (typeof start !== "number" || !Number.isSafeInteger(start) || start < 1) {
    throw protocolError(`start_stream_seq is ${JSON.stringify(start)}`, tenant, afterSeq);
  }
  return {
    kind: "plan",
    stream,
    filterSubject,
    startStreamSeq: start,
    lastSeq: seqField(body["last_seq"], "last_seq", tenant, afterSeq),
  };
}
