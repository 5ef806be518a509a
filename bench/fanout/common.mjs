/**
 * What both fan-out load generators share (bench/fanout.py drives them):
 * the spec file, the bounded connect ramp, the receive clock, the sample
 * recorder and the line protocol on stdin/stdout.
 *
 * Protocol: the worker connects its clients (at most `concurrency` connects
 * in flight), then prints one `{"type":"ready",...}` line with every
 * client's connect time. On stdin, `measure` resets the counters (event
 * loop delay, CPU, samples) and starts recording commit → receive
 * latencies; `count` prints how many events were received since;
 * `stop` prints `{"type":"done",...}`, writes the latencies
 * (Float64, µs, native byte order) to `spec.latencyFile` and exits.
 *
 * The receive clock is `Date.now()`: CLOCK_REALTIME, the clock of
 * Postgres' commit timestamps, in whole milliseconds; a receive is dated
 * at the middle of its millisecond (±0.5 ms). Not `performance.timeOrigin +
 * performance.now()`: that is the monotonic clock, and on a VM whose
 * realtime clock is slewed or stepped it drifts away from the commit
 * timestamps (10 ms in 2 s on the development machine).
 */

import { readFileSync, writeFileSync } from "node:fs";
import { monitorEventLoopDelay, performance } from "node:perf_hooks";
import { createInterface } from "node:readline";

/** Wall-clock now in Unix µs, ±0.5 ms (see the module comment). */
export function nowUs() {
  return Date.now() * 1000 + 500;
}

/**
 * The worker's spec (JSON file named by argv[2]): `url`, `tenants` (tenant →
 * token), `clients`, `offset` (first client's global index), `concurrency`,
 * `latencyFile`, and kind-specific fields.
 */
export function readSpec() {
  const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
  spec.tenantList = Object.keys(spec.tenants).sort();
  return spec;
}

/** The tenant of global client `i`: round-robin, so every tenant gets clients/tenants. */
export function tenantOf(spec, i) {
  return spec.tenantList[(spec.offset + i) % spec.tenantList.length];
}

/** Unix µs of an RFC 3339 timestamp with up to nanosecond digits (`…:05.123456789Z`). */
export function rfc3339Us(text) {
  const m = /^(.*:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(text);
  if (m === null) {
    return NaN;
  }
  return Date.parse(m[1] + m[3]) * 1000 + Number(((m[2] ?? "") + "000000").slice(0, 6));
}

/** Growing Float64 buffer of latencies in µs, per-tenant receive counts. */
export class Recorder {
  #samples = new Float64Array(1 << 16);
  #n = 0;
  recording = false;
  received = 0;
  perTenant = {};
  disconnects = {};
  /** Connect phases' durations in ms by name (e.g. the login alone). */
  phases = {};

  phase(name, ms) {
    (this.phases[name] ??= []).push(Math.round(ms * 10) / 10);
  }

  /** A client's connection ended, for `reason`. */
  disconnected(reason) {
    this.disconnects[reason] = (this.disconnects[reason] ?? 0) + 1;
  }

  /** One event received by one client: `commitUs` from the event, received now. */
  event(tenant, commitUs) {
    const now = nowUs();
    if (!this.recording || !Number.isFinite(commitUs)) {
      return;
    }
    this.received++;
    this.perTenant[tenant] = (this.perTenant[tenant] ?? 0) + 1;
    if (this.#n === this.#samples.length) {
      const bigger = new Float64Array(this.#samples.length * 2);
      bigger.set(this.#samples);
      this.#samples = bigger;
    }
    this.#samples[this.#n++] = now - commitUs;
  }

  write(path) {
    writeFileSync(path, new Uint8Array(this.#samples.buffer, 0, this.#n * 8));
    return this.#n;
  }
}

/**
 * Runs `connectOne(i)` for clients 0..n-1 with at most `concurrency` in
 * flight; each resolves when its client is subscribed (or rejects). Returns
 * connect times in ms (from the start of that client's connect) and the
 * failures by message.
 */
export async function ramp(n, concurrency, connectOne) {
  const connectMs = [];
  const errors = {};
  let next = 0;
  async function lane() {
    while (next < n) {
      const i = next++;
      const t0 = performance.now();
      try {
        await connectOne(i);
        connectMs.push(performance.now() - t0);
      } catch (err) {
        const key = String(err?.message ?? err).slice(0, 120);
        errors[key] = (errors[key] ?? 0) + 1;
      }
    }
  }
  await Promise.all(Array.from({ length: Math.min(n, concurrency) }, lane));
  return { connectMs, errors };
}

/** Rejects after `ms` with `what`, unless `promise` settles first. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

/**
 * The worker's life: connect every client (`connectOne`), report, then obey
 * `measure` / `stop` from stdin. `close()` closes every client at the end.
 */
export async function runWorker(spec, recorder, connectOne, close) {
  const t0 = performance.now();
  const perTenant = {};
  const { connectMs, errors } = await ramp(spec.clients, spec.concurrency, async (i) => {
    await connectOne(i);
    const tenant = tenantOf(spec, i);
    perTenant[tenant] = (perTenant[tenant] ?? 0) + 1;
  });
  emit({
    type: "ready",
    connected: connectMs.length,
    per_tenant: perTenant,
    errors,
    connect_ms: connectMs.map((v) => Math.round(v * 10) / 10),
    phases_ms: recorder.phases,
    ramp_seconds: Math.round(performance.now() - t0) / 1000,
  });
  const loop = monitorEventLoopDelay({ resolution: 10 });
  let cpu0 = process.cpuUsage();
  let m0 = performance.now();
  for await (const line of createInterface({ input: process.stdin })) {
    if (line === "measure") {
      loop.enable();
      loop.reset();
      cpu0 = process.cpuUsage();
      m0 = performance.now();
      recorder.recording = true;
    } else if (line === "count") {
      emit({ type: "count", received: recorder.received });
    } else if (line === "stop") {
      recorder.recording = false;
      loop.disable();
      const cpu = process.cpuUsage(cpu0);
      const samples = recorder.write(spec.latencyFile);
      emit({
        type: "done",
        received: recorder.received,
        samples,
        per_tenant: recorder.perTenant,
        disconnects: recorder.disconnects,
        cpu_s: Math.round((cpu.user + cpu.system) / 1000) / 1000,
        wall_s: Math.round(performance.now() - m0) / 1000,
        loop_delay_ms: {
          p50: Math.round(loop.percentile(50) / 1e4) / 100,
          p99: Math.round(loop.percentile(99) / 1e4) / 100,
          max: Math.round(loop.max / 1e4) / 100,
        },
        rss_mb: Math.round(process.memoryUsage.rss() / 1e5) / 10,
      });
      await close();
      process.exit(0);
    }
  }
}
