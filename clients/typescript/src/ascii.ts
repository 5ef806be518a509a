/**
 * Short ASCII strings (ids, keys, statuses, header values) built from bytes
 * without a TextDecoder: its call costs more than the loop for strings this
 * short, and most of a state load's strings are.
 *
 * No Node-only APIs here: this runs in browsers too.
 *
 * @module
 */

/** The longest string built here; longer ones are left to a TextDecoder. */
export const SHORT_ASCII_MAX = 128;

/**
 * A reusable array of character codes per length: `fromCharCode.apply`
 * reads an array, and setting a shared array's `length` per string was a
 * visible cost of its own.
 */
const codesByLength: number[][] = Array.from({ length: SHORT_ASCII_MAX + 1 }, (_, n) => new Array<number>(n).fill(0));

/**
 * `bytes[start..end)` as a string when they are at most
 * {@link SHORT_ASCII_MAX} ASCII bytes; `undefined` otherwise (decode them
 * as UTF-8 instead).
 */
export function shortAscii(bytes: Uint8Array, start: number, end: number): string | undefined {
  const len = end - start;
  if (len > SHORT_ASCII_MAX) {
    return undefined;
  }
  const codes = codesByLength[len]!;
  for (let i = 0; i < len; i++) {
    const b = bytes[start + i]!;
    if (b >= 0x80) {
      return undefined;
    }
    codes[i] = b;
  }
  return String.fromCharCode.apply(null, codes);
}
