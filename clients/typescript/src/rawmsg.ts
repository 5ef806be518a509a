/**
 * A received message's subject, header block and payload as bytes, straight
 * from nats.js' receive buffer, for the state read's per-row loop.
 *
 * Why: nats.js' public `subject` runs a TextDecoder per message and its
 * `headers` decode the whole block into a map of arrays (a string, a split,
 * a validation and a canonical key per line). With the garbage they leave,
 * that was ~15 % of a 10,000-row load, for two or three short values.
 *
 * The fields read here (nats-core's `MsgImpl._msg` and `._rdata`, and the
 * reply subject for `pull.ts`) are nats.js internals; package.json pins
 * nats.js exactly and `test/unit/rawmsg.test.ts` checks that the pinned
 * version takes this path and reads what the public API reads. When they are not shaped as
 * expected, {@link rawParts} returns `undefined` and the caller uses the
 * public API.
 *
 * Scanning bytes gives the same answers as nats.js' string scan: the bytes
 * looked for (`\r\n`, `:`, `.`) never occur inside a multi-byte UTF-8
 * sequence.
 *
 * No Node-only APIs here: this runs in browsers too.
 *
 * @module
 */

import type { Msg } from "@nats-io/nats-core";

import { shortAscii } from "./ascii.js";

/** A message's bytes: views into nats.js' buffer, valid while the message is. */
export interface RawParts {
  readonly subject: Uint8Array;
  /** The header block (`NATS/1.0\r\n…\r\n\r\n`) then the payload. */
  readonly bytes: Uint8Array;
  /** Where the header block ends and the payload starts (0: no headers). */
  readonly headerEnd: number;
}

/** nats-core's `MsgImpl`, as far as it is read here. */
interface MsgImplFields {
  _msg?: { subject?: unknown; reply?: unknown; hdr?: unknown };
  _rdata?: unknown;
}

const CR = 0x0d;
const LF = 0x0a;
const COLON = 0x3a;
const utf8 = new TextDecoder();

/** nats-core's fields of a core message (a `JsMsg` holds one as `msg`). */
function fields(msg: Msg): MsgImplFields {
  return msg as unknown as MsgImplFields;
}

/** The message's bytes, or `undefined` when nats.js does not hold them as expected. */
export function rawParts(msg: Msg): RawParts | undefined {
  const inner = fields(msg);
  const subject = inner._msg?.subject;
  const hdr = inner._msg?.hdr;
  const bytes = inner._rdata;
  if (!(subject instanceof Uint8Array) || !(bytes instanceof Uint8Array) || typeof hdr !== "number") {
    return undefined;
  }
  if (hdr > bytes.length) {
    return undefined;
  }
  return { subject, bytes, headerEnd: Math.max(hdr, 0) };
}

/**
 * The reply subject's bytes (`undefined`: none) when nats.js holds them as
 * expected, else `msg.reply` (`""`: none) from the public API.
 */
function replyField(msg: Msg): Uint8Array | string | undefined {
  const inner = fields(msg)._msg;
  if (inner?.subject instanceof Uint8Array) {
    const reply = inner.reply;
    return reply instanceof Uint8Array ? reply : undefined;
  }
  return msg.reply ?? "";
}

/** Whether the message has a reply subject, without decoding it. */
export function hasReply(msg: Msg): boolean {
  const reply = replyField(msg);
  return reply !== undefined && reply.length > 0;
}

/** The message's reply subject (`""`: none). */
export function replyText(msg: Msg): string {
  const reply = replyField(msg);
  if (reply instanceof Uint8Array) {
    return text(reply, 0, reply.length);
  }
  return reply ?? "";
}

/** `bytes[start..end)` as text, decoded as nats.js decodes it (UTF-8, lenient). */
export function text(bytes: Uint8Array, start: number, end: number): string {
  return shortAscii(bytes, start, end) ?? utf8.decode(bytes.subarray(start, end));
}

/** An ASCII header name as bytes, for {@link headerValues}. */
export function headerName(name: string): Uint8Array {
  return new TextEncoder().encode(name);
}

/**
 * The first value of each of `names` in the header block, trimmed, into
 * `out` (`""` when absent): what nats.js' `headers.get(name)` returns
 * (exact name match, first value, `trim()`). At most 31 names.
 */
export function headerValues(raw: RawParts, names: readonly Uint8Array[], out: string[]): void {
  out.fill("", 0, names.length);
  const { bytes, headerEnd } = raw;
  let found = 0; // a bit per name: its first value is taken
  // The first line is the status line (`NATS/1.0`), never a header.
  let line = lineEnd(bytes, 0, headerEnd) + 2;
  while (line < headerEnd) {
    const end = lineEnd(bytes, line, headerEnd);
    const colon = indexOf(bytes, COLON, line, end);
    if (colon >= 0) {
      for (let n = 0; n < names.length; n++) {
        if ((found & (1 << n)) === 0 && sameBytes(bytes, line, colon, names[n]!)) {
          found |= 1 << n;
          out[n] = text(bytes, colon + 1, end).trim();
        }
      }
    }
    line = end + 2;
  }
}

/** Where the line starting at `from` ends (its `\r\n`, or `limit`). */
function lineEnd(bytes: Uint8Array, from: number, limit: number): number {
  for (let i = from; i + 1 < limit; i++) {
    if (bytes[i] === CR && bytes[i + 1] === LF) {
      return i;
    }
  }
  return limit;
}

/**
 * The first `byte` in `bytes[from..limit)`, or -1. A loop: the receive
 * buffer is a Node `Buffer`, whose `indexOf` is a native call that costs
 * more than scanning a few dozen bytes.
 */
export function indexOf(bytes: Uint8Array, byte: number, from: number, limit: number): number {
  for (let i = from; i < limit; i++) {
    if (bytes[i] === byte) {
      return i;
    }
  }
  return -1;
}

function sameBytes(bytes: Uint8Array, start: number, end: number, name: Uint8Array): boolean {
  if (end - start !== name.length) {
    return false;
  }
  for (let i = 0; i < name.length; i++) {
    if (bytes[start + i] !== name[i]) {
      return false;
    }
  }
  return true;
}
