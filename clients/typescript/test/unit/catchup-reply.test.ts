// Parsing catch-up replies (SPEC §7), success and every error shape.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import type { Msg } from "@nats-io/nats-core";
import { headers } from "@nats-io/nats-core";

import { TransientCatchupFailure, parseReply } from "../../src/catchup.js";
import { CatchupError, WalcastError } from "../../src/errors.js";

function reply(body: string, h: Record<string, string> = {}): Msg {
  const hdrs = headers();
  for (const [k, v] of Object.entries(h)) {
    hdrs.set(k, v);
  }
  return { data: new TextEncoder().encode(body), headers: Object.keys(h).length > 0 ? hdrs : undefined } as unknown as Msg;
}

const micro = (code: string, name: string) => ({ "Nats-Service-Error-Code": code, "Nats-Service-Error": name });

describe("parseReply", () => {
  it("reads a plan", () => {
    const answer = parseReply(
      reply('{"stream":"WALCAST","filter_subject":"walcast.acme.>","start_stream_seq":9123,"last_seq":57}'),
      "acme",
      41n,
    );
    assert.deepEqual(answer, {
      kind: "plan",
      stream: "WALCAST",
      filterSubject: "walcast.acme.>",
      startStreamSeq: 9123,
      lastSeq: 57n,
    });
  });

  it("too_old carries oldest_seq", () => {
    const answer = parseReply(reply('{"error":"too_old","oldest_seq":12}', micro("410", "too_old")), "acme", 3n);
    assert.deepEqual(answer, { kind: "too_old", oldestSeq: 12n });
  });

  it("ahead and bad_request are definite CatchupErrors", () => {
    assert.throws(
      () => parseReply(reply('{"error":"ahead","last_seq":5}', micro("416", "ahead")), "acme", 9n),
      (err: unknown) => err instanceof CatchupError && err.reason === "ahead" && err.status === 416 && err.afterSeq === 9n,
    );
    assert.throws(
      () => parseReply(reply('{"error":"bad_request"}', micro("400", "bad_request")), "acme", 0n),
      (err: unknown) => err instanceof CatchupError && err.reason === "bad_request" && err.code === "catchup_rejected",
    );
  });

  it("headers alone are enough", () => {
    assert.throws(
      () => parseReply(reply("", micro("416", "ahead")), "acme", 9n),
      (err: unknown) => err instanceof CatchupError && err.reason === "ahead",
    );
  });

  it("5xx and unknown codes are transient", () => {
    assert.throws(
      () => parseReply(reply('{"error":"unavailable"}', micro("503", "unavailable")), "acme", 1n),
      TransientCatchupFailure,
    );
  });

  it("a malformed success body is a protocol error", () => {
    for (const body of ["nope", "[]", '{"stream":"W"}', '{"stream":"W","filter_subject":"f","start_stream_seq":0,"last_seq":1}']) {
      assert.throws(
        () => parseReply(reply(body), "acme", 1n),
        (err: unknown) => err instanceof WalcastError && err.code === "catchup_protocol",
      );
    }
  });
});
