/**
 * gateway_fanout load generator: `spec.clients` Socket.IO connections to
 * clients/typescript/examples/socketio-gateway, each like its page
 * (public/board.js): handshake `auth: { token, lastSeq: "0" }` (a fresh
 * page: the gateway sends the tenant's snapshot, then events), connected
 * when the gateway says `live`; every `change` is one event in the proto3
 * JSON mapping, whose `commitTime` is the Postgres commit time.
 *
 * Differences from a browser, on purpose: `transports: ["websocket"]` (no
 * HTTP long-polling phase before the upgrade, which would add two requests
 * per socket and needs sticky sessions behind a balancer), `forceNew` (one
 * engine.io connection per socket, as separate pages have; the default would
 * multiplex them all over one) and no reconnection (a dropped socket is
 * counted, not retried).
 *
 *   node socketio.mjs <spec.json>   (spec: see common.mjs)
 */

import { io } from "socket.io-client";

import { readSpec, Recorder, rfc3339Us, runWorker, tenantOf, withTimeout } from "./common.mjs";

const spec = readSpec();
const recorder = new Recorder();
const sockets = [];

function connectOne(i) {
  const tenant = tenantOf(spec, i);
  const socket = io(spec.url, {
    auth: { token: spec.tenants[tenant], lastSeq: "0" },
    transports: ["websocket"],
    forceNew: true,
    reconnection: false,
  });
  sockets.push(socket);
  socket.on("change", (event) => recorder.event(tenant, rfc3339Us(event.commitTime)));
  const live = new Promise((resolve, reject) => {
    socket.once("live", resolve);
    socket.once("connect_error", reject);
    socket.once("disconnect", (reason) => reject(new Error(`disconnected: ${reason}`)));
  });
  socket.on("disconnect", (reason) => recorder.disconnected(reason));
  return withTimeout(live, spec.connectTimeoutMs, "socket.io live");
}

await runWorker(spec, recorder, connectOne, async () => {
  for (const socket of sockets) {
    socket.close();
  }
});
