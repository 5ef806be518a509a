/**
 * Example realtime gateway: Express serves the board page, Socket.IO carries
 * each tenant's rows (from walcast's state bucket) and then its walcast
 * events to browsers, one room per tenant. It never reads Postgres.
 *
 *   GATEWAY_TOKENS=secret-a=acme,secret-b=globex NATS_URL=nats://127.0.0.1:4222 npm start
 *
 * Security: the tenant comes from the server-side token lookup in the
 * handshake; nothing the browser sends can pick another tenant's room.
 */

import { createServer } from "node:http";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { connect } from "@nats-io/transport-node";
import express from "express";
import { Server } from "socket.io";

import { loadConfig } from "./config.js";
import type { GatewayServer } from "./protocol.js";
import { TenantHub } from "./tenant-hub.js";

const config = loadConfig();
const publicDir = join(dirname(fileURLToPath(import.meta.url)), "../public");

const nc = await connect({
  servers: config.natsUrl,
  name: "walcast-socketio-gateway",
  maxReconnectAttempts: -1,
  waitOnFirstConnect: true,
});

const app = express();
app.disable("x-powered-by");
app.use(express.static(publicDir));
app.get("/healthz", (_req, res) => {
  res.type("text").send(nc.isClosed() ? "nats closed\n" : "ok\n");
});

const http = createServer(app);
const io: GatewayServer = new Server(http, { pingInterval: 10_000, pingTimeout: 5_000 });

/** Parses the browser's lastSeq; anything odd means "from the start". */
function parseSeq(value: unknown): bigint {
  const text = typeof value === "number" ? String(value) : value;
  return typeof text === "string" && /^\d{1,20}$/.test(text) ? BigInt(text) : 0n;
}

io.use((socket, next) => {
  const auth = socket.handshake.auth as Record<string, unknown>;
  const tenant = typeof auth["token"] === "string" ? config.tokens.get(auth["token"]) : undefined;
  if (tenant === undefined) {
    next(new Error("unauthorized"));
    return;
  }
  // Whatever else the browser sent (a "tenant" field, say) is ignored.
  socket.data.tenant = tenant;
  socket.data.lastSeq = parseSeq(auth["lastSeq"]);
  next();
});

const hubs = new Map<string, TenantHub>();

function hubFor(tenant: string): TenantHub {
  let hub = hubs.get(tenant);
  if (hub === undefined) {
    const created: TenantHub = new TenantHub({
      io,
      nc,
      tenant,
      subjectPrefix: config.subjectPrefix,
      stateBucket: config.stateBucket,
      idleMs: config.hubIdleMs,
      onStop: () => {
        if (hubs.get(tenant) === created) {
          hubs.delete(tenant);
        }
      },
    });
    hub = created;
    hubs.set(tenant, hub);
  }
  return hub;
}

io.on("connection", (socket) => {
  const { tenant, lastSeq } = socket.data;
  socket.emit("hello", { tenant });
  socket.emit("upstream", { state: nc.isClosed() ? "reconnecting" : "connected" });
  hubFor(tenant)
    .attach(socket, lastSeq)
    .catch((err: Error) => {
      console.error(`gateway: tenant ${tenant}: ${err.message}`);
      socket.disconnect(true);
    });
});

// Tell every page when the gateway's own NATS link drops and comes back.
void (async () => {
  for await (const status of nc.status()) {
    if (status.type === "disconnect" || status.type === "reconnecting") {
      io.emit("upstream", { state: "reconnecting" });
    } else if (status.type === "reconnect") {
      io.emit("upstream", { state: "connected" });
    }
  }
})();

http.listen(config.port, config.host, () => {
  const address = http.address();
  const port = typeof address === "object" && address !== null ? address.port : config.port;
  console.log(`gateway listening on http://${config.host}:${port}`);
});

async function shutdown(): Promise<void> {
  await Promise.all([...hubs.values()].map((hub) => hub.stop()));
  io.close();
  await nc.drain().catch(() => {});
  process.exit(0);
}
process.once("SIGTERM", () => void shutdown());
process.once("SIGINT", () => void shutdown());
