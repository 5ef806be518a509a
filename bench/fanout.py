"""Fan-out scenarios (issue 20; issue 21 item 5): thousands of live clients
of one tenant each, 10 tenants, while a writer commits single-row
transactions at a fixed rate (pgbench -R, open loop).

- ws_fanout: the clients are browsers' worth of NATS-over-WebSocket
  connections straight to one nats-server (deploy/nats/auth-callout.conf;
  `walcast run` answers the auth callout), each doing what
  clients/typescript/examples/browser-board does (bench/fanout/nats-ws.mjs).
- gateway_fanout: the clients are Socket.IO connections to
  clients/typescript/examples/socketio-gateway (bench/fanout/socketio.mjs),
  which relays from an unauthenticated nats-server.

Per client count: connect time (from the start of a client's connect until
it is subscribed and live) p50/p99, commit (the event's Postgres commit
timestamp) → client receive p50/p99, RSS of the server the clients hold per
1,000 clients (RSS with them minus RSS before, after a short settle), and
the CPU of every process, the load generator's included, with its event
loop delay (how late its receive timestamps can be). The load generator is
Node (bench/fanout/package.json, installed with `npm ci`), in
`--fanout-workers` processes. Orchestration only here; run.py's helpers do
the rest (run.py registers itself as the module `run`).
"""

import json
import os
import queue
import resource
import subprocess
import threading
import time
from array import array
from types import SimpleNamespace

import latency as lat
import logins
import run as h

FANOUT = h.HERE / "fanout"
CLIENT = h.ROOT / "clients/typescript"
GATEWAY = CLIENT / "examples/socketio-gateway"
TENANTS = 10
# Tenants `<prefix>0` .. `<prefix>9`; the title names the pgbench client.
WRITER_SQL = """\\set t random(0, 9)
INSERT INTO tasks (id, tenant_id, title, priority) VALUES (gen_random_uuid(), '{prefix}' || :t, 'c' || :client_id, 1);
"""


def add_arguments(ap):
    ap.add_argument("--fanout-clients", default="1000,5000", help="ws_fanout/gateway_fanout: client counts")
    ap.add_argument("--fanout-seconds", type=int, default=60, help="fan-out: seconds of writes per client count")
    ap.add_argument("--fanout-rate", type=int, default=100, help="fan-out: commits/s of the writer")
    ap.add_argument("--fanout-workers", type=int, default=2, help="fan-out: Node load generator processes")
    ap.add_argument("--fanout-ws-client", choices=("ts", "raw"), default="ts",
                    help="ws_fanout: @walcast/client's loadAndFollow like the browser example (ts), or a core NATS "
                         "subscription per client (raw, bench/fanout/nats-raw.mjs: a generator that keeps up)")
    ap.add_argument("--fanout-concurrency", type=int, default=200,
                    help="fan-out: client connects in flight at once (over all workers)")


# --- Node --------------------------------------------------------------------------------

def npm(cwd, *args):
    subprocess.run(["npm", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def newest_mtime(*paths):
    times = [0.0]
    for p in paths:
        if p.is_dir():
            times += [f.stat().st_mtime for f in p.rglob("*") if f.is_file()]
        elif p.exists():
            times.append(p.stat().st_mtime)
    return max(times)


def stale(target, *sources):
    return not target.exists() or target.stat().st_mtime < newest_mtime(*sources)


def prepare_node():
    """`npm ci` where the lock file is newer than the install; builds the
    client and the gateway example where their sources are newer."""
    for d in (FANOUT, CLIENT):
        if stale(d / "node_modules/.package-lock.json", d / "package-lock.json"):
            h.log(f"  npm ci in {d.relative_to(h.ROOT)}")
            npm(d, "ci", "--no-audit", "--no-fund")
    if stale(CLIENT / "dist/index.js", CLIENT / "src"):
        npm(CLIENT, "run", "build")
    if stale(GATEWAY / "dist/server.js", GATEWAY / "src", CLIENT / "dist"):
        npm(CLIENT, "run", "build:example")


def raise_nofile():
    """Open-file limit of this process and its children (servers, Node) up to the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Workers:
    """The Node load generator: `n` clients over --fanout-workers processes,
    driven by the line protocol of bench/fanout/common.mjs."""

    def __init__(self, ctx, script, n, url, tokens, extra, name):
        a = ctx.args
        count = max(1, min(a.fanout_workers, n))
        self.lines = queue.Queue()
        self.procs, self.files = [], []
        for w in range(count):
            lo, hi = n * w // count, n * (w + 1) // count
            self.files.append(ctx.work / f"{name}-w{w}.f64")
            spec = dict(url=url, tenants=tokens, clients=hi - lo, offset=lo, latencyFile=str(self.files[-1]),
                        concurrency=max(1, a.fanout_concurrency // count), connectTimeoutMs=60_000, **extra)
            spec_path = ctx.work / f"{name}-w{w}.json"
            spec_path.write_text(json.dumps(spec))
            with open(ctx.work / f"{name}-w{w}.log", "wb") as err:
                p = subprocess.Popen(["node", str(FANOUT / script), str(spec_path)], cwd=FANOUT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            h.STARTED.append(("proc", p))
            self.procs.append(p)
            threading.Thread(target=self._read, args=(w, p), daemon=True).start()

    def _read(self, w, p):
        for line in p.stdout:
            self.lines.put((w, json.loads(line)))
        self.lines.put((w, None))

    @property
    def pids(self):
        return {f"client-w{w}": p.pid for w, p in enumerate(self.procs)}

    def send(self, command):
        for p in self.procs:
            p.stdin.write(command + "\n")
            p.stdin.flush()

    def collect(self, kind, timeout):
        """One `kind` line from every worker."""
        got = {}
        deadline = time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                w, obj = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"load generator: no {kind!r} from {len(self.procs) - len(got)} worker(s) "
                                   f"in {timeout}s") from None
            if obj is None:
                if w in got:  # it answered, then exited (after `stop`)
                    continue
                raise RuntimeError(f"load generator worker {w} exited ({self.procs[w].wait()}); see its log")
            if obj["type"] == kind:
                got[w] = obj
        return [got[w] for w in sorted(got)]

    def latencies_us(self):
        out = array("d")
        for f in self.files:
            out.frombytes(f.read_bytes())
        return out

    def stop(self):
        for p in self.procs:
            h.stop_proc(p, timeout=10)


# --- one round ------------------------------------------------------------------------------

def expected_receives(pg, prefix, connected_per_tenant):
    """Events × subscribed clients, per tenant, for the rows the writer committed."""
    rows = pg.sql(f"SELECT tenant_id, count(*) FROM tasks WHERE tenant_id LIKE '{prefix}%' GROUP BY 1")
    total = 0
    for line in rows.splitlines():
        tenant, count = line.split("|")
        total += int(count) * connected_per_tenant.get(tenant, 0)
    return total


def wait_received(workers, expected, timeout=60.0):
    """Polls the workers' counts until every expected event is in, or for
    `timeout` (a saturated worker answers late, or not in time)."""
    deadline = time.monotonic() + timeout
    received = 0
    while time.monotonic() < deadline:
        workers.send("count")
        try:
            received = sum(c["received"] for c in workers.collect("count", max(1.0, deadline - time.monotonic())))
        except TimeoutError:
            break
        if received >= expected:
            break
        time.sleep(0.5)
    return received


def merged(counts):
    """Sum of {key: count} dicts."""
    out = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def connect_summary(ready):
    """Connect times (and the timed phases of a connect) over every worker's `ready` line."""
    def pcts(values_ms):
        p = lat.summarize_raw([v * 1000 for v in values_ms])  # summarize_raw takes µs
        return {"p50_ms": p["p50_ms"], "p99_ms": p["p99_ms"], "max_ms": p["max_ms"]}

    names = {k for r in ready for k in r.get("phases_ms", {})}
    phases = {k: pcts([v for r in ready for v in r["phases_ms"].get(k, [])]) for k in names}
    return dict(pcts([v for r in ready for v in r["connect_ms"]]),
                connected=sum(r["connected"] for r in ready), failed=merged(r["errors"] for r in ready),
                phases=phases, ramp_seconds=max(r["ramp_seconds"] for r in ready),
                per_tenant=merged(r["per_tenant"] for r in ready))


def client_summary(done):
    """The load generator's own figures over the write window: is it the bottleneck?"""
    wall = max(d["wall_s"] for d in done)
    cpu = sum(d["cpu_s"] for d in done)
    received = sum(d["received"] for d in done)
    return {"cpu_s": round(cpu, 2), "cpu_percent_of_one_core": round(cpu / wall * 100, 1),
            "cpu_us_per_received": round(cpu / received * 1e6, 1) if received else None,
            "loop_delay_p99_ms": max(d["loop_delay_ms"]["p99"] for d in done),
            "loop_delay_max_ms": max(d["loop_delay_ms"]["max"] for d in done),
            "rss_mb": [d["rss_mb"] for d in done], "workers": len(done),
            "disconnects": merged(d["disconnects"] for d in done)}


def measure(ctx, workers, prefix, connected_per_tenant):
    """The writer's window: pgbench at --fanout-rate, then the stragglers."""
    a = ctx.args
    workers.send("measure")
    pb = h.run_pgbench(ctx, a.fanout_rate, a.fanout_seconds, WRITER_SQL.format(prefix=prefix))
    pb.pop("_schedule", None)
    expected = expected_receives(ctx.pg, prefix, connected_per_tenant)
    wait_received(workers, expected)
    workers.send("stop")
    done = workers.collect("done", 600)  # a saturated worker works through its backlog first
    return {"pgbench": pb, "expected": expected, "received": sum(d["received"] for d in done),
            "clients_cpu": client_summary(done)}


def rss_mb(pid):
    return round(h.proc_status_mb(pid, "VmRSS"), 1)


def fanout_round(ctx, prefix, n, server, watch, script, url, tokens, extra=None):
    """`n` clients of `server` ((name, pid): the process whose RSS per 1,000
    clients is reported) over the tenants `<prefix>0..9` of `tokens`;
    `watch`: {name: pid} of the other processes timed."""
    time.sleep(2)  # the server settles after its start
    server_name, server_pid = server
    rss = {"before": rss_mb(server_pid)}
    workers = Workers(ctx, script, n, url, tokens, extra or {}, prefix)
    try:
        conn = connect_summary(workers.collect("ready", 600))
        h.log(f"    {conn['connected']}/{n} connected in {conn['ramp_seconds']} s, connect p50 {conn['p50_ms']} "
              f"p99 {conn['p99_ms']} ms (phases {conn['phases']}), failed {conn['failed']}")
        time.sleep(2)
        rss["with_clients"] = rss_mb(server_pid)
        s = h.Sampler(interval=0.25)
        for k, pid in {server_name: server_pid, **watch, **workers.pids}.items():
            s.watch(k, pid, from_zero=False)
        r = dict(clients=n, connect=conn, load_avg_before=h.loadavg(), server=server_name, server_rss_mb=rss)
        r.update(measure(ctx, workers, prefix, conn["per_tenant"]))
        s.stop()
        r["latency"] = lat.summarize_raw(workers.latencies_us())
    finally:
        workers.stop()
    return round_result(r, s, [server_name, *watch, *workers.pids])


def round_result(r, sampler, names):
    """Adds the CPU, the RSS per 1,000 clients and the machine's load to round `r`, and logs it."""
    cpu = r["cpu_s"] = {k: sampler.cpu(k) for k in names}
    server, rss, received = r["server"], r["server_rss_mb"], r["received"]
    rss["peak_during_writes"] = sampler.rss_peak.get(server)
    n = r["connect"]["connected"]
    r["server_rss_mb_per_1000_clients"] = round((rss["with_clients"] - rss["before"]) / (n / 1000), 1) if n else None
    r["server_cpu_us_per_delivery"] = round(cpu[server] / received * 1e6, 1) if received else None
    r["machine"] = sampler.machine(cpu)
    l_, c_ = r["latency"], r["clients_cpu"]
    h.log(f"    commit→receive p50 {l_['p50_ms']} p99 {l_['p99_ms']} max {l_['max_ms']} ms ({received}/"
          f"{r['expected']}); {server} RSS +{r['server_rss_mb_per_1000_clients']} MB per 1,000, "
          f"{r['server_cpu_us_per_delivery']} CPU-µs per delivery; clients CPU {c_['cpu_percent_of_one_core']} % "
          f"of a core, loop delay p99 {c_['loop_delay_p99_ms']} ms; cpu {cpu}")
    return r


# --- the two scenarios -------------------------------------------------------------------------

def tenant_tokens(prefix, make):
    return {f"{prefix}{i}": make(f"{prefix}{i}") for i in range(TENANTS)}


def wait_state_ready(wc, timeout=120):
    """walcast ready and its state backfill finished (clients load the state first)."""
    wc.wait_ready()
    h.wait_log(wc.logpath, "state backfill complete", wc.proc, timeout)


def ws_round(ctx, n):
    """n NATS-over-WebSocket clients of one nats-server with the auth callout (`walcast run`)."""
    pg, slot = ctx.pg, f"wc_wsfan{n}"
    pg.create_slot(slot)
    nats, _, ws_port, nats_url = h.callout_nats(ctx, f"nats-wsfan{n}")
    wc = h.Walcast(ctx.walcast_bin, ctx.work, pg, SimpleNamespace(url=nats_url), slot,
                   extra_env=h.callout_env(nats_url), name=f"wsfan{n}")
    try:
        wait_state_ready(wc)
        h.wait_log(wc.logpath, "auth callout answering", wc.proc)
        secret = (h.DEMO_KEYS / "demo-app-jwt-secret").read_bytes().rstrip()
        exp = int(time.time()) + 3600
        prefix = f"ws{n}t"
        tokens = tenant_tokens(prefix, lambda t: logins.hs256_token(secret, {"tenant_id": t, "exp": exp}))
        script = {"ts": "nats-ws.mjs", "raw": "nats-raw.mjs"}[ctx.args.fanout_ws_client]
        return fanout_round(ctx, prefix, n, ("nats-server", nats.pid), {"walcast": wc.pid}, script,
                            f"ws://127.0.0.1:{ws_port}", tokens, {"clientDir": str(CLIENT)})
    finally:
        wc.stop()
        h.stop_proc(nats)
        pg.drop_slot(slot)


def start_gateway(ctx, n, nats_url, tokens):
    port = h.free_port()
    env = dict(os.environ, GATEWAY_TOKENS=",".join(f"{tok}={t}" for t, tok in tokens.items()), NATS_URL=nats_url,
               HOST="127.0.0.1", PORT=str(port))
    logpath = ctx.work / f"gateway-{n}.log"
    with open(logpath, "wb") as glog:
        gw = subprocess.Popen(["node", "dist/server.js"], cwd=GATEWAY, env=env, stdout=glog, stderr=subprocess.STDOUT)
    h.STARTED.append(("proc", gw))
    h.wait_log(logpath, "gateway listening", gw)
    return gw, f"http://127.0.0.1:{port}"


def gateway_round(ctx, n):
    """n Socket.IO clients of the gateway example, which relays from walcast's nats-server."""
    pg, slot = ctx.pg, f"wc_gwfan{n}"
    pg.create_slot(slot)
    nats = h.NatsServer(ctx.work, ctx.nats_bin, f"gwfan{n}")
    wc = h.Walcast(ctx.walcast_bin, ctx.work, pg, nats, slot, name=f"gwfan{n}")
    gw = None
    try:
        wait_state_ready(wc)
        prefix = f"gw{n}t"
        tokens = tenant_tokens(prefix, lambda t: f"token-{t}")
        gw, url = start_gateway(ctx, n, nats.url, tokens)
        return fanout_round(ctx, prefix, n, ("gateway", gw.pid), {"walcast": wc.pid, "nats-server": nats.proc.pid},
                            "socketio.mjs", url, tokens)
    finally:
        if gw is not None:
            h.stop_proc(gw)
        wc.stop()
        nats.stop()
        pg.drop_slot(slot)


def scenario(ctx, label, round_fn):
    a = ctx.args
    counts = [int(x) for x in str(a.fanout_clients).split(",") if x]
    h.log(f"{label}: {counts} clients over {TENANTS} tenants, {a.fanout_rate} commits/s for {a.fanout_seconds}s")
    prepare_node()
    out = {"open_file_limit": raise_nofile(), "rate": a.fanout_rate, "seconds": a.fanout_seconds,
           "ws_client": a.fanout_ws_client,
           "workers": a.fanout_workers, "concurrency": a.fanout_concurrency}
    for n in counts:
        h.log(f"  {n} clients")
        try:
            out[str(n)] = round_fn(ctx, n)
        except Exception as e:  # noqa: BLE001 — keep the other client counts
            h.log(f"    FAILED: {e}")
            out[str(n)] = {"error": str(e)}
    return out


def scenario_ws_fanout(ctx):
    return scenario(ctx, "scenario 11 (issue 20): WebSocket fan-out on NATS", ws_round)


def scenario_gateway_fanout(ctx):
    return scenario(ctx, "scenario 12 (issue 21): Socket.IO gateway fan-out", gateway_round)


# --- reporting ---------------------------------------------------------------------------------

TITLES = {"ws_fanout": "11 WebSocket fan-out on NATS", "gateway_fanout": "12 Socket.IO gateway fan-out"}


def rounds(sc):
    for key, title in TITLES.items():
        if key == "ws_fanout" and key in sc:
            title += f" ({sc[key].get('ws_client')} client)"
        for n, r in (sc.get(key) or {}).items():
            if isinstance(r, dict) and n.isdigit():
                yield title, int(n), r


def summary_rows(sc):
    rows = []
    for title, n, r in rounds(sc):
        label = f"{title}, {n:,} clients"
        if "error" in r:
            rows.append((label, "scenario", None, "", False, f"FAILED: {r['error'][:160]}"))
            continue
        c, l_ = r["connect"], r["latency"]
        rows.append((label, "connect p99 ms", c["p99_ms"], "< 2000", h.met(c["p99_ms"], 2000, False),
                     f"{c['connected']}/{n} connected in {c['ramp_seconds']} s; p50 {c['p50_ms']} ms"
                     + "".join(f"; {k} alone p50 {v['p50_ms']} / p99 {v['p99_ms']} ms"
                               for k, v in c.get("phases", {}).items())))
        drops = r["clients_cpu"]["disconnects"]
        all_in = r["received"] >= r["expected"] * 0.999
        rows.append((label, "commit → receive p99 ms", l_["p99_ms"], "< 100",
                     h.met(l_["p99_ms"], 100, False) and all_in,
                     f"p50 {l_['p50_ms']} ms; {r['received']}/{r['expected']} received"
                     + (f", disconnected: {drops}" if drops else "") + f"; clients "
                     f"{r['clients_cpu']['cpu_percent_of_one_core']} % of a core, loop delay p99 "
                     f"{r['clients_cpu']['loop_delay_p99_ms']} ms"))
        rows.append((label, f"{r['server']} RSS MB per 1,000 clients", r["server_rss_mb_per_1000_clients"], "—", None,
                     f"{r['server_rss_mb']['before']} → {r['server_rss_mb']['with_clients']} MB"))
    return rows


def markdown(res):
    out = []
    for title, n, r in rounds(res["scenarios"]):
        if "error" in r:
            continue
        if not out:
            out = ["", "Fan-out detail (CPU seconds over the write window; client = all load generator processes):",
                   "", "| scenario | clients | connect p50 / p99 / max ms | commit → receive p50 / p99 / max ms | "
                       "received / expected | server RSS before → with MB | server CPU-µs per delivery | CPU s | "
                       "clients: % core, loop delay p99 ms | machine busy (foreign) | load before |",
                   "|---|---|---|---|---|---|---|---|---|---|---|"]
        c, l_, m = r["connect"], r["latency"], r["machine"]
        cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_s"].items())
        out.append(f"| {title} | {n:,} | {c['p50_ms']} / {c['p99_ms']} / {c['max_ms']} | {l_['p50_ms']} / "
                   f"{l_['p99_ms']} / {l_['max_ms']} | {r['received']:,} / {r['expected']:,} | "
                   f"{r['server_rss_mb']['before']} → {r['server_rss_mb']['with_clients']} | "
                   f"{r.get('server_cpu_us_per_delivery')} | {cpu} | {r['clients_cpu']['cpu_percent_of_one_core']}, "
                   f"{r['clients_cpu']['loop_delay_p99_ms']} | {round(m['utilization'] * 100)} % "
                   f"({round(m.get('foreign_share', 0) * 100)} %) | {r['load_avg_before']} |")
    return out
