// Benchmark floor for examples/state-load.mjs: how long nats.js alone takes
// to receive a tenant's keys from the state bucket, the way a load reads
// them (an ordered consumer, deliver "last per subject", until nothing is
// pending), without decoding anything or checking the backfill marker.
// What a load takes beyond this is the client's own work. Prints one JSON
// line; `bench/run.py --scenarios state_load` runs it beside the loader.
//
//   npm run build && node examples/state-floor.mjs nats://127.0.0.1:4222 --tenant t --loads 20

import { connect } from "@nats-io/transport-node";
import { DeliverPolicy, jetstream } from "@nats-io/jetstream";

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

/** Milliseconds to receive every key of the tenant once, and how many came. */
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
const times = [];
let keys = 0;
for (let i = 0; i < a.loads; i++) {
  const { ms, received } = await readOnce(a, js);
  keys = received;
  times.push(ms);
}
await connection.close();
const round = (x) => Math.round(x * 10) / 10;
const first = times[0];
const sorted = [...times].sort((x, y) => x - y);
console.log(JSON.stringify({
  client: "nats.js, no decoding (floor)",
  tenant: a.tenant,
  messages: keys,
  loads: a.loads,
  first_ms: round(first),
  p50_ms: round(sorted[Math.floor((sorted.length - 1) / 2)]),
  max_ms: round(sorted[sorted.length - 1]),
  each_ms: times.map(round),
}));
