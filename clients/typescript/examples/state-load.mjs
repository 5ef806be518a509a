// Benchmark: how long `loadAndFollow()` takes to yield a tenant's snapshot
// (SPEC §6: 10,000 rows p99 <= 100 ms, 100,000 rows <= 1 s), the
// TypeScript twin of clients/rust/examples/state_load.rs.
//
// Times --loads loads of --tenant against a bucket a real walcast filled:
// from the call to the snapshot item, every row decoded; checks the
// snapshot has --rows rows. The loads share one NATS connection, as a
// gateway's do (and as the Rust loader's). Prints one JSON line.
// `bench/run.py --scenarios state_load` runs it after the Rust loader.
//
//   npm run build && node examples/state-load.mjs nats://127.0.0.1:4222 --tenant t --rows 10000 --loads 20

import { connect } from "@nats-io/transport-node";
import { loadAndFollow } from "../dist/index.js";

function args(argv) {
  const a = { url: "nats://127.0.0.1:4222", tenant: "big", rows: 10_000, loads: 10 };
  for (let i = 0; i < argv.length; i++) {
    const next = () => argv[++i];
    switch (argv[i]) {
      case "--tenant": a.tenant = next(); break;
      case "--rows": a.rows = Number(next()); break;
      case "--loads": a.loads = Number(next()); break;
      default: a.url = argv[i];
    }
  }
  return a;
}

/** Milliseconds from the call to the snapshot, and the snapshot's size. */
async function loadOnce(a, connection) {
  const started = performance.now();
  const load = loadAndFollow({ connection, tenant: a.tenant, logger: { warn: () => {}, info: () => {} } });
  try {
    const first = await load[Symbol.asyncIterator]().next();
    const ms = performance.now() - started;
    if (first.done || first.value.type !== "snapshot") {
      throw new Error(`expected a snapshot first, got ${first.done ? "the end" : first.value.type}`);
    }
    return { ms, rows: first.value.rows.size };
  } finally {
    await load.close();
  }
}

function percentile(sorted, p) {
  const i = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, i)];
}

const a = args(process.argv.slice(2));
const connection = await connect({ servers: a.url });
const times = [];
for (let i = 0; i < a.loads; i++) {
  const { ms, rows } = await loadOnce(a, connection);
  if (rows !== a.rows) {
    console.error(`load ${i}: ${rows} rows, expected ${a.rows}`);
    process.exit(1);
  }
  times.push(ms);
}
await connection.close();
const each = times.map((x) => Math.round(x * 10) / 10);
times.sort((x, y) => x - y);
const round = (x) => Math.round(x * 10) / 10;
console.log(JSON.stringify({
  client: "typescript",
  node: process.version,
  tenant: a.tenant,
  rows: a.rows,
  loads: a.loads,
  p50_ms: round(percentile(times, 50)),
  p99_ms: round(percentile(times, 99)),
  max_ms: round(times[times.length - 1]),
  rss_mb: round(process.memoryUsage().rss / 2 ** 20),
  each_ms: each,
}));
