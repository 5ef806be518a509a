// Option defaults and validation.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { WalcastError } from "../../src/errors.js";
import { resolveOptions } from "../../src/options.js";

const invalid = (fn: () => unknown) =>
  assert.throws(fn, (err: unknown) => err instanceof WalcastError && err.code === "invalid_options");

describe("resolveOptions", () => {
  it("applies the documented defaults", () => {
    const s = resolveOptions({ tenant: "acme" });
    assert.equal(s.tenant, "acme");
    assert.equal(s.afterSeq, 0n);
    assert.equal(s.servers, "nats://127.0.0.1:4222");
    assert.equal(s.subjectPrefix, "walcast");
    assert.equal(s.stream, "WALCAST");
    assert.equal(s.dedupWindow, 10_000);
    assert.equal(s.requestTimeout, 2_000);
    assert.equal(s.repairTimeout, 15_000);
    assert.equal(s.maxBackoff, 5_000);
  });

  it("accepts numbers, bigints and 'latest' as afterSeq", () => {
    assert.equal(resolveOptions({ tenant: "a", afterSeq: 41 }).afterSeq, 41n);
    assert.equal(resolveOptions({ tenant: "a", afterSeq: 41n }).afterSeq, 41n);
    assert.equal(resolveOptions({ tenant: "a", afterSeq: "latest" }).afterSeq, "latest");
  });

  it("'*' means all tenants", () => {
    const s = resolveOptions({ tenant: "*", positions: { a: 3, b: 4n } });
    assert.equal(s.tenant, undefined);
    assert.deepEqual([...s.positions], [["a", 3n], ["b", 4n]]);
  });

  it("rejects what walcast would not route or cannot mean", () => {
    for (const tenant of ["", "a.b", "a b", ">", "é", "x".repeat(129)]) {
      invalid(() => resolveOptions({ tenant }));
    }
    invalid(() => resolveOptions({ tenant: "a", afterSeq: -1 }));
    invalid(() => resolveOptions({ tenant: "a", afterSeq: 1.5 }));
    invalid(() => resolveOptions({ tenant: "*", afterSeq: 5 }));
    invalid(() => resolveOptions({ tenant: "a", positions: { a: 1 } }));
    invalid(() => resolveOptions({ tenant: "*", positions: { "a.b": 1 } }));
    invalid(() => resolveOptions({ tenant: "a", subjectPrefix: "walcast.>" }));
    invalid(() => resolveOptions({ tenant: "a", requestTimeout: 0 }));
    invalid(() => resolveOptions({ tenant: "a", dedupWindow: 0 }));
  });
});
