/**
 * Decoding `ChangeEvent`s fast: a state load decodes one per row, and
 * protobuf-es' `fromBinary` (reflection per field: a lookup per tag, a
 * wrapper per message) was a quarter of a 10,000-row load's CPU.
 *
 * The decoder is compiled once from the generated schema (so it follows the
 * .proto, never a hand-kept copy of it) into a table per message: field
 * number → how to read it. It builds the same plain objects `fromBinary`
 * does (`$typeName`, zero values, `{ case, value }` oneofs, BigInt 64-bit
 * integers). Anything it does not expect (an unknown field from a newer
 * walcast, a repeated message field, a wire type that does not match,
 * invalid UTF-8, truncated input) sends that message to `fromBinary`, which
 * gives protobuf-es' answer (unknown fields kept, errors as it reports them).
 *
 * No Node-only APIs: this runs in browsers too.
 *
 * @module
 */

import type { DescField, DescMessage } from "@bufbuild/protobuf";
import { fromBinary, ScalarType } from "@bufbuild/protobuf";

import { shortAscii } from "./ascii.js";
import type { ChangeEvent } from "./gen/walcast/v1/events_pb.js";
import { ChangeEventSchema } from "./gen/walcast/v1/events_pb.js";

/** Thrown inside the fast path: hand this message to `fromBinary`. */
class Unusual extends Error {}

const WIRE_VARINT = 0;
const WIRE_LEN = 2;

/** A position in the bytes being read. */
interface Cursor {
  buf: Uint8Array;
  pos: number;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Target = Record<string, any>;

/** How one field number is read into its message object. */
interface FieldPlan {
  readonly wire: number;
  read(c: Cursor, end: number, target: Target): void;
}

/** A message type, ready to decode. */
interface MessagePlan {
  readonly typeName: string;
  /** Fields with a zero value, in declaration order (as `create` sets them). */
  readonly zeros: ReadonlyArray<readonly [string, () => unknown]>;
  /** Indexed by field number. */
  readonly fields: ReadonlyArray<FieldPlan | undefined>;
}

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** The high 32 bits of the last {@link varint} (a second result without an array). */
let varintHi = 0;

/** A varint's low 32 bits; its high ones are left in {@link varintHi}. */
function varint(c: Cursor, end: number): number {
  let lo = 0;
  let hi = 0;
  for (let shift = 0; shift < 70; shift += 7) {
    if (c.pos >= end) {
      throw new Unusual();
    }
    const b = c.buf[c.pos++]!;
    if (shift < 28) {
      lo |= (b & 0x7f) << shift;
    } else if (shift === 28) {
      lo |= (b & 0x0f) << 28;
      hi |= (b & 0x7f) >> 4;
    } else {
      hi |= (b & 0x7f) << (shift - 32);
    }
    if (b < 0x80) {
      varintHi = hi;
      return lo;
    }
  }
  throw new Unusual();
}

/**
 * A varint that fits 28 bits (tags, lengths), without the pair `varint`
 * allocates; anything longer is left to `fromBinary`.
 */
function small(c: Cursor, end: number): number {
  const { buf } = c;
  let value = 0;
  for (let shift = 0; shift < 28; shift += 7) {
    if (c.pos >= end) {
      throw new Unusual();
    }
    const b = buf[c.pos++]!;
    value |= (b & 0x7f) << shift;
    if (b < 0x80) {
      return value;
    }
  }
  throw new Unusual();
}

/** A length prefix and the end of what it covers. */
function delimited(c: Cursor, end: number): number {
  const len = small(c, end);
  const stop = c.pos + len;
  if (stop > end) {
    throw new Unusual();
  }
  return stop;
}

/**
 * A string reader that hands back its previous string when the bytes are
 * the same (a tenant id, a status): one string shared by every row instead
 * of one each, so less for the collector to copy. Only short ASCII strings
 * are remembered, so equal bytes mean an equal string.
 */
function rememberingUtf8(): (c: Cursor, end: number) => string {
  let last = "";
  return (c, end) => {
    const stop = delimited(c, end);
    const len = stop - c.pos;
    if (len === last.length) {
      // From the end: values that differ (ids, counters, timestamps)
      // mostly differ there, after a shared prefix.
      const { buf, pos } = c;
      let i = len;
      while (i > 0 && buf[pos + i - 1] === last.charCodeAt(i - 1)) {
        i--;
      }
      if (i === 0) {
        c.pos = stop;
        return last;
      }
    }
    const ascii = shortAscii(c.buf, c.pos, stop);
    if (ascii !== undefined) {
      last = ascii;
    }
    return finishString(c, stop, ascii);
  };
}

/** Moves the cursor to `stop`: `ascii` if read already, else the bytes strictly as UTF-8. */
function finishString(c: Cursor, stop: number, ascii: string | undefined): string {
  let text = ascii;
  if (text === undefined) {
    try {
      text = strictUtf8.decode(c.buf.subarray(c.pos, stop));
    } catch {
      throw new Unusual();
    }
  }
  c.pos = stop;
  return text;
}

function utf8(c: Cursor, end: number): string {
  const stop = delimited(c, end);
  return finishString(c, stop, shortAscii(c.buf, c.pos, stop));
}

const TWO_32 = 4294967296;

/**
 * A 64-bit reader that hands back its previous BigInt for the same bits (a
 * version, a timestamp's seconds): BigInts are immutable, so rows can share
 * one, and each one not allocated is one the collector does not copy.
 */
function remembering64(toBigInt: (lo: number, hi: number) => bigint): (c: Cursor, end: number) => bigint {
  let lastLo = 0;
  let lastHi = 0;
  let last = 0n;
  return (c, end) => {
    const lo = varint(c, end);
    const hi = varintHi;
    if (lo !== lastLo || hi !== lastHi) {
      lastLo = lo;
      lastHi = hi;
      last = toBigInt(lo, hi);
    }
    return last;
  };
}

/** Reads one scalar of `type` (varint kinds and strings; others are not compiled). */
function scalarReader(type: ScalarType): ((c: Cursor, end: number) => unknown) | undefined {
  switch (type) {
    case ScalarType.STRING:
      return rememberingUtf8();
    case ScalarType.BYTES:
      return (c, end) => {
        const stop = delimited(c, end);
        const bytes = c.buf.subarray(c.pos, stop);
        c.pos = stop;
        return bytes;
      };
    case ScalarType.BOOL:
      return (c, end) => {
        const lo = varint(c, end);
        return lo !== 0 || varintHi !== 0;
      };
    case ScalarType.INT32:
      return (c, end) => varint(c, end) | 0;
    case ScalarType.UINT32:
      return (c, end) => varint(c, end) >>> 0;
    case ScalarType.UINT64:
      return remembering64((lo, hi) => {
        const h = hi >>> 0;
        return h < 0x200000 ? BigInt(h * TWO_32 + (lo >>> 0)) : BigInt.asUintN(64, (BigInt(h) << 32n) | BigInt(lo >>> 0));
      });
    case ScalarType.INT64:
      return remembering64((lo, hi) =>
        hi >= 0 && hi < 0x200000
          ? BigInt(hi * TWO_32 + (lo >>> 0))
          : BigInt.asIntN(64, (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)),
      );
    default:
      return undefined;
  }
}

function zeroOf(type: ScalarType): (() => unknown) | undefined {
  switch (type) {
    case ScalarType.STRING:
      return () => "";
    case ScalarType.BYTES:
      return () => new Uint8Array(0);
    case ScalarType.BOOL:
      return () => false;
    case ScalarType.INT32:
    case ScalarType.UINT32:
      return () => 0;
    case ScalarType.INT64:
    case ScalarType.UINT64:
      return () => 0n;
    default:
      return undefined;
  }
}

/** The plan for `desc`, or `undefined` if it uses something not compiled here. */
function compile(desc: DescMessage, plans: Map<string, MessagePlan | undefined>): MessagePlan | undefined {
  if (plans.has(desc.typeName)) {
    return plans.get(desc.typeName);
  }
  const fields: Array<FieldPlan | undefined> = [];
  const zeros: Array<readonly [string, () => unknown]> = [];
  const plan: MessagePlan = { typeName: desc.typeName, zeros, fields };
  plans.set(desc.typeName, plan); // recursion: a message may contain its own type
  const zeroOfField = new Map<DescField, () => unknown>();
  for (const field of desc.fields) {
    const compiled = fieldPlan(field, plans);
    if (compiled === undefined) {
      plans.set(desc.typeName, undefined);
      return undefined;
    }
    fields[field.number] = compiled.plan;
    if (compiled.zero !== undefined) {
      zeroOfField.set(field, compiled.zero);
    }
  }
  // `members`: the fields outside oneofs and the oneofs, in declaration order.
  for (const member of desc.members) {
    if (member.kind === "oneof") {
      zeros.push([member.localName, () => ({ case: undefined })]);
    } else {
      const zero = zeroOfField.get(member);
      if (zero !== undefined) {
        zeros.push([member.localName, zero]);
      }
    }
  }
  return plan;
}

function fieldPlan(
  field: DescField,
  plans: Map<string, MessagePlan | undefined>,
): { plan: FieldPlan; zero: (() => unknown) | undefined } | undefined {
  const name = field.localName;
  switch (field.fieldKind) {
    case "scalar":
    case "enum": {
      const type = field.fieldKind === "enum" ? ScalarType.INT32 : field.scalar;
      const read = scalarReader(type);
      const zero = zeroOf(type);
      if (read === undefined || zero === undefined || field.oneof !== undefined || (field.fieldKind === "scalar" && field.longAsString)) {
        return undefined;
      }
      // Presence EXPLICIT (1): absent unless set; IMPLICIT (2): a zero value.
      if (field.presence !== 1 && field.presence !== 2) {
        return undefined;
      }
      const explicit = field.presence === 1;
      const wire = type === ScalarType.STRING || type === ScalarType.BYTES ? WIRE_LEN : WIRE_VARINT;
      return {
        plan: { wire, read: (c, end, t) => void (t[name] = read(c, end)) },
        zero: explicit ? undefined : zero,
      };
    }
    case "message": {
      if (field.delimitedEncoding) {
        return undefined;
      }
      // A type still being compiled (it contains itself) is already in
      // `plans`, and read from there once complete.
      if (compile(field.message, plans) === undefined) {
        return undefined;
      }
      const oneof = field.oneof?.localName;
      const read = (c: Cursor, end: number, t: Target): void => {
        const inner = plans.get(field.message.typeName);
        if (inner === undefined) {
          throw new Unusual();
        }
        const stop = delimited(c, end);
        if (oneof === undefined) {
          if (t[name] !== undefined) {
            throw new Unusual(); // a second occurrence merges: fromBinary's job
          }
          t[name] = decodeMessage(inner, c, stop);
        } else {
          if (t[oneof].case !== undefined) {
            throw new Unusual();
          }
          t[oneof] = { case: name, value: decodeMessage(inner, c, stop) };
        }
      };
      return { plan: { wire: WIRE_LEN, read }, zero: undefined };
    }
    case "list": {
      if (field.listKind !== "scalar" || field.scalar !== ScalarType.STRING) {
        return undefined;
      }
      return {
        plan: { wire: WIRE_LEN, read: (c, end, t) => void (t[name] as string[]).push(utf8(c, end)) },
        zero: () => [],
      };
    }
    case "map": {
      if (field.mapKey !== ScalarType.STRING || field.mapKind !== "scalar" || field.scalar !== ScalarType.STRING) {
        return undefined;
      }
      const read = (c: Cursor, end: number, t: Target): void => {
        const stop = delimited(c, end);
        let key = "";
        let value = "";
        while (c.pos < stop) {
          const tag = small(c, stop);
          if (tag === ((1 << 3) | WIRE_LEN)) {
            key = utf8(c, stop);
          } else if (tag === ((2 << 3) | WIRE_LEN)) {
            value = utf8(c, stop);
          } else {
            throw new Unusual();
          }
        }
        (t[name] as Record<string, string>)[key] = value;
      };
      return { plan: { wire: WIRE_LEN, read }, zero: () => ({}) };
    }
    default:
      return undefined;
  }
}

function decodeMessage(plan: MessagePlan, c: Cursor, end: number): Target {
  const target: Target = { $typeName: plan.typeName };
  for (const [name, zero] of plan.zeros) {
    target[name] = zero();
  }
  while (c.pos < end) {
    const tag = small(c, end);
    const field = plan.fields[tag >>> 3];
    if (field === undefined || (tag & 7) !== field.wire) {
      throw new Unusual();
    }
    field.read(c, end, target);
  }
  if (c.pos !== end) {
    throw new Unusual();
  }
  return target;
}

/** `undefined` when the schema uses something the fast path does not compile. */
const changeEventPlan = compile(ChangeEventSchema, new Map());

/**
 * A `ChangeEvent` from its binary form in `bytes[start..end)` (all of
 * them by default): the same object `fromBinary` returns, and the same
 * error for bytes that are not one.
 */
export function decodeChangeEvent(bytes: Uint8Array, start = 0, end = bytes.length): ChangeEvent {
  return decodeFast(bytes, start, end) ?? fromBinary(ChangeEventSchema, bytes.subarray(start, end));
}

/** The fast path alone: `undefined` where it leaves the bytes to `fromBinary`. */
export function decodeFast(bytes: Uint8Array, start = 0, end = bytes.length): ChangeEvent | undefined {
  if (changeEventPlan === undefined) {
    return undefined;
  }
  try {
    return decodeMessage(changeEventPlan, { buf: bytes, pos: start }, end) as ChangeEvent;
  } catch (err) {
    if (err instanceof Unusual) {
      return undefined;
    }
    throw err;
  }
}
