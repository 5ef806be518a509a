// Benchmark floor for examples/state-load.mjs: how long it takes to receive
// a tenant's keys from the state bucket the way a load reads them (a
// consumer with deliver "last per subject", until nothing is pending), with
// nothing decoded and no backfill marker checked. What a load takes beyond
// this is the client's own work. Two ways, interleaved: the client's
// (a subscription with its own pull requests, dist/pull.js: `p50_ms`,
// `first_ms`) and nats.js' consume() (`consume_p50_ms`, `consume_first_ms`),
// which the client used up to session 23. Prints one JSON line;
// `bench/run.py --scenarios state_load` runs it beside the loader.
//
//   npm run build && node examples/state-floor.mjs nats://127.0.0.1:4222 --tenant t --loads 20

import { connect } from "@nats-io/transport-node";
import { AckPolicy, DeliverPolicy, jetstream, jetstreamManager } from "@nats-io/jetstream";
import { nanos } from "@nats-io/nats-core";
import { pullAll } from "../dist/pull.js";

function args(argv) {
  const a = { url: "nats://127.0.0.1:4222", tenant: "big", loads: 10, bucket: "WALCAST_STATE" };
  for (let i = 0; i < argv.length; i++) {
    const next = () => argv[++i];
    switch (argv[i]) {
      case "--tenant": a.tenant = next(); break;
      case "--loads": a.loads = Number(next()); break;
      case "--bucket": a.bucket = next(); break;
      default: a.url = argv[i];
    }
  }
  return a;
}

/** The same, the client's way: a subscription with its own pull requests. */
async function pullOnce(a, jsm, connection) {
  const started = performance.now();
  const stream = `KV_${a.bucket}`;
  const info = await jsm.consumers.add(stream, {
    name: `floor_${Math.random().toString(36).slice(2)}`,
    filter_subject: `$KV.${a.bucket}.${a.tenant}.>`,
    deliver_policy: DeliverPolicy.LastPerSubject,
    ack_policy: AckPolicy.None,
    inactive_threshold: nanos(5 * 60 * 1000),
    num_replicas: 1,
    mem_storage: true,
  });
  let received = 0;
  await pullAll({
    nc: connection,
    stream,
    consumer: info.name,
    numPending: info.num_pending,
    batch: 512,
    stallMs: 10_000,
    signal: new AbortController().signal,
    onMessage: () => received++,
  });
  const ms = performance.now() - started;
  await jsm.consumers.delete(stream, info.name).catch(() => {});
  return { ms, received };
}

/** Milliseconds for nats.js' consume() to receive every key of the tenant once, and how many came. */
async function readOnce(a, js) {
  const started = performance.now();
  const consumer = await js.consumers.get(`KV_${a.bucket}`, {
    filter_subjects: [`$KV.${a.bucket}.${a.tenant}.>`],
    deliver_policy: DeliverPolicy.LastPerSubject,
  });
  const messages = await consumer.consume({ max_messages: 512 });
  let received = 0;
  for await (const msg of messages) {
    received++;
    if (msg.info.pending === 0) {
      break;
    }
  }
  const ms = performance.now() - started;
  await consumer.delete().catch(() => {});
  return { ms, received };
}

const a = args(process.argv.slice(2));
const connection = await connect({ servers: a.url });
const js = jetstream(connection);
const jsm = await jetstreamManager(connection);
const times = [];
const consumeTimes = [];
let keys = 0;
for (let i = 0; i < a.loads; i++) {
  const pulled = await pullOnce(a, jsm, connection);
  const consumed = await readOnce(a, js);
  if (pulled.received !== consumed.received) {
    throw new Error(`pulled ${pulled.received} keys, consume() ${consumed.received}`);
  }
  keys = pulled.received;
  times.push(pulled.ms);
  consumeTimes.push(consumed.ms);
}
await connection.close();
const round = (x) => Math.round(x * 10) / 10;
const p50 = (xs) => round([...xs].sort((x, y) => x - y)[Math.floor((xs.length - 1) / 2)]);
console.log(JSON.stringify({
  client: "nats.js, no decoding (floor)",
  tenant: a.tenant,
  messages: keys,
  loads: a.loads,
  first_ms: round(times[0]),
  p50_ms: p50(times),
  max_ms: round(Math.max(...times)),
  consume_first_ms: round(consumeTimes[0]),
  consume_p50_ms: p50(consumeTimes),
  each_ms: times.map(round),
  consume_each_ms: consumeTimes.map(round),
}));
