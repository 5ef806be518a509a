/**
 * ws_fanout load generator: `spec.clients` browsers' worth of NATS-over-
 * WebSocket connections, each doing exactly what
 * clients/typescript/examples/browser-board does — `wsconnect` with the
 * tenant's login token (walcast's auth callout turns it into a user of that
 * tenant) and inbox prefix `_INBOX_<tenant>`, then `loadAndFollow` (the
 * tenant's rows from the state bucket, then its events). A client is
 * connected when `loadAndFollow` says `live`.
 *
 * The client code is the repository's own: `@walcast/client` from
 * clients/typescript/dist and `@nats-io/nats-core` resolved from there (the
 * copy the client itself uses). Node 20 has no global WebSocket, so
 * nats-core's `wsFactory` hook gets a socket from the `ws` package.
 *
 *   node nats-ws.mjs <spec.json>   (spec: see common.mjs, plus `clientDir`)
 */

import { createRequire } from "node:module";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { pathToFileURL } from "node:url";

import WebSocket from "ws";

import { readSpec, Recorder, runWorker, tenantOf, withTimeout } from "./common.mjs";

const spec = readSpec();
const { wsconnect } = createRequire(join(spec.clientDir, "package.json"))("@nats-io/nats-core");
const { loadAndFollow } = await import(pathToFileURL(join(spec.clientDir, "dist/index.js")).href);

const recorder = new Recorder();
const open = [];

/** nats-core's hook for a WebSocket implementation. */
async function wsFactory(url) {
  return { socket: new WebSocket(url), encrypted: url.startsWith("wss://") };
}

async function connectOne(i) {
  const tenant = tenantOf(spec, i);
  const t0 = performance.now();
  const nc = await wsconnect({
    servers: spec.url,
    token: spec.tenants[tenant],
    inboxPrefix: `_INBOX_${tenant}`,
    wsFactory,
    maxReconnectAttempts: 0,
  });
  open.push(nc);
  recorder.phase("login", performance.now() - t0);
  void nc.closed().then((err) => recorder.disconnected(err ? String(err.message).slice(0, 80) : "closed"));
  let live;
  const isLive = new Promise((resolve, reject) => {
    live = { resolve, reject };
  });
  const subscription = loadAndFollow(
    { connection: nc, tenant },
    {
      onSnapshot: () => {},
      onLive: () => live.resolve(),
      onEvent: (event) => {
        const t = event.commitTime;
        recorder.event(tenant, Number(t.seconds) * 1e6 + t.nanos / 1000);
      },
      onError: (err) => live.reject(err),
    },
  );
  open.push(subscription);
  await withTimeout(isLive, spec.connectTimeoutMs, "loadAndFollow live");
}

await runWorker(spec, recorder, connectOne, async () => {
  await Promise.allSettled(open.map((o) => o.close()));
});
