/**
 * ws_fanout's light load generator (`--fanout-ws-client raw`): the same
 * login as nats-ws.mjs (NATS over WebSocket, the tenant's token as
 * `auth_token`, walcast's auth callout), then one core NATS subscription
 * on `walcast.<tenant>.>` — which the issued user may do (SPEC §9) — and
 * nothing else: no JetStream consumer, no protobuf decoding beyond the
 * event's `commit_time`. Connected = the server's PONG after CONNECT, SUB,
 * PING.
 *
 * Why it exists: with @walcast/client each client also has a JetStream
 * consumer on the server (pull requests, heartbeats) and decodes every
 * event in full; this one isolates the nats-server's WebSocket fan-out
 * (one core subscription per connection, the cheapest a browser can do)
 * and the generator's own per-message cost (docs/BENCHMARKS.md compares
 * both at 1,000 and 5,000 clients).
 *
 *   node nats-raw.mjs <spec.json>   (spec: see common.mjs)
 */

import WebSocket from "ws";

import { readSpec, Recorder, runWorker, tenantOf, withTimeout } from "./common.mjs";

const spec = readSpec();
const recorder = new Recorder();
const sockets = [];
const CRLF = Buffer.from("\r\n");

/** Unix µs of ChangeEvent field 8 (commit_time: seconds = 1, nanos = 2) in `body`, or NaN. */
function commitTimeUs(body) {
  let i = 0;
  const varint = () => {
    let result = 0;
    let scale = 1;
    for (;;) {
      const b = body[i++];
      result += (b & 0x7f) * scale;
      if (b < 0x80) return result;
      scale *= 128;
    }
  };
  while (i < body.length) {
    const key = varint();
    const wire = key & 7;
    if (key === (8 << 3) + 2) {
      const end = varint() + i;
      let secs = 0;
      let nanos = 0;
      while (i < end) {
        const k = varint();
        if (k === 0x08) secs = varint();
        else if (k === 0x10) nanos = varint();
        else return NaN;
      }
      return secs * 1e6 + nanos / 1000;
    }
    if (wire === 0) varint();
    else if (wire === 1) i += 8;
    else if (wire === 2) {
      const length = varint(); // before reading `i`: `i += varint()` would add to the old `i`
      i += length;
    }
    else if (wire === 5) i += 4;
    else return NaN;
  }
  return NaN;
}

/** A NATS protocol reader over WebSocket frames (a message may span frames). */
class Parser {
  #buf = Buffer.alloc(0);

  constructor(handlers) {
    this.handlers = handlers;
  }

  feed(data) {
    this.#buf = this.#buf.length === 0 ? data : Buffer.concat([this.#buf, data]);
    let start = 0;
    for (;;) {
      const eol = this.#buf.indexOf(CRLF, start);
      if (eol < 0) break;
      const line = this.#buf.toString("latin1", start, eol);
      if (line.startsWith("HMSG") || line.startsWith("MSG")) {
        const parts = line.split(" ");
        const total = Number(parts[parts.length - 1]);
        const headers = line.startsWith("HMSG") ? Number(parts[parts.length - 2]) : 0;
        const bodyStart = eol + 2;
        if (this.#buf.length < bodyStart + total + 2) break; // the rest comes in the next frame
        this.handlers.message(this.#buf.subarray(bodyStart + headers, bodyStart + total));
        start = bodyStart + total + 2;
        continue;
      }
      this.handlers.line(line);
      start = eol + 2;
    }
    this.#buf = this.#buf.subarray(start);
  }
}

function connectOne(i) {
  const tenant = tenantOf(spec, i);
  const socket = new WebSocket(spec.url);
  sockets.push(socket);
  const connected = new Promise((resolve, reject) => {
    const parser = new Parser({
      line(line) {
        if (line.startsWith("INFO")) {
          const connect = { verbose: false, pedantic: false, auth_token: spec.tenants[tenant], lang: "raw",
            version: "0", protocol: 1, headers: true, no_responders: true };
          socket.send(`CONNECT ${JSON.stringify(connect)}\r\nSUB walcast.${tenant}.> 1\r\nPING\r\n`);
        } else if (line === "PONG") {
          resolve();
        } else if (line === "PING") {
          socket.send("PONG\r\n");
        } else if (line.startsWith("-ERR")) {
          reject(new Error(line));
        }
      },
      message(body) {
        recorder.event(tenant, commitTimeUs(body));
      },
    });
    socket.on("message", (data) => parser.feed(data));
    socket.on("error", reject);
    socket.on("close", (code) => {
      recorder.disconnected(`closed ${code}`);
      reject(new Error("closed"));
    });
  });
  return withTimeout(connected, spec.connectTimeoutMs, "NATS PONG");
}

await runWorker(spec, recorder, connectOne, async () => {
  for (const socket of sockets) {
    socket.terminate();
  }
});
