#!/usr/bin/env python3
"""walcast benchmark harness (issue 7; SPEC §6). Entry point: scripts/bench.sh.

Starts its own PostgreSQL and nats-server on random ports (never the
machine's own services), generates the workloads, runs each scenario against
walcast and against the baseline `pg_recvlogical` on the same data, and
writes bench/results/latest.json and bench/results/latest.md.

Every machine-dependent figure is reported together with a ratio against a
baseline measured in the same run: throughput against pg_recvlogical
draining the same slot backlog (in interleaved rounds, the fastest run of
each kind counting, with the foreign CPU load of every run recorded),
latency against pg_recvlogical's own commit → receive floor. See
docs/BENCHMARKS.md.

Standard library only; SQL goes through the psql / pgbench / pg_recvlogical
binaries.
"""

import argparse
import base64
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import latency as lat  # noqa: E402
import wire  # noqa: E402
from natsproto import Nats, stream_info  # noqa: E402

# Run as a script, this module is __main__; scenario modules (fanout.py)
# `import run` for its helpers and must get this module, STARTED included.
sys.modules.setdefault("run", sys.modules[__name__])

ROOT = HERE.parent
CLK = os.sysconf("SC_CLK_TCK")
IS_ROOT = os.geteuid() == 0
T0 = time.monotonic()

STARTED = []  # (kind, object) for cleanup on any exit


def log(msg):
    print(f"[bench {time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


# --- /proc ------------------------------------------------------------------

def proc_cpu(pid):
    """utime + stime of a process in seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def proc_status_mb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def machine_jiffies():
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    idle = vals[3] + vals[4]  # idle + iowait
    total = sum(vals[:8])
    return total - idle, total


def self_cpu():
    """CPU seconds of this harness process (all its threads) and its reaped children."""
    t = os.times()
    return t.user + t.system


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def cpu_model():
    """The CPU's model name and the kernel: figures differ 2x between machines."""
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        names = []
    return f"{names[0] if names else 'unknown CPU'}, Linux {os.uname().release}"


def uptime_text():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return f"load average: {loadavg()}"


class Sampler:
    """Samples CPU seconds and RSS of named processes every `interval`, and
    the whole machine's CPU, so each run can report how much of the machine
    other work (other test runs, builds) took while it was measured."""

    def __init__(self, interval=0.05):
        self.interval = interval
        self.pids = {}
        self.base = {}
        self.last = {}
        self.rss_peak = {}
        self.rss_series = {}
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.t_start = time.monotonic()
        self.m_start = machine_jiffies()
        self.self_start = self_cpu()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def watch(self, name, pid, from_zero=True):
        """Track `pid`; its CPU counts from 0 (a process started for this
        run) or from now."""
        c = proc_cpu(pid)
        with self.lock:
            self.pids[name] = pid
            self.base[name] = 0.0 if from_zero else (c or 0.0)
            self.last[name] = c if c is not None else self.base[name]
            self.rss_series.setdefault(name, [])

    def _run(self):
        while not self.stop_flag.wait(self.interval):
            self.sample()

    def sample(self):
        now = time.monotonic() - self.t_start
        with self.lock:
            items = list(self.pids.items())
        for name, pid in items:
            c = proc_cpu(pid)
            rss = proc_status_mb(pid, "VmRSS")
            with self.lock:
                if c is not None:
                    self.last[name] = c
                if rss is not None:
                    self.rss_peak[name] = max(self.rss_peak.get(name, 0.0), rss)
                    series = self.rss_series[name]
                    if not series or now - series[-1][0] >= 0.5:
                        series.append((round(now, 2), round(rss, 1)))

    def cpu(self, name):
        with self.lock:
            if name not in self.last:
                return None
            return round(self.last[name] - self.base[name], 3)

    def machine(self, ours=None):
        """Whole-machine CPU over the run. `ours`: CPU seconds of the measured
        processes; the rest (minus the harness itself) is foreign load — other
        work on the machine that competed with the measurement."""
        busy0, total0 = self.m_start
        busy1, total1 = machine_jiffies()
        wall = time.monotonic() - self.t_start
        busy_s = (busy1 - busy0) / CLK
        out = {"wall_s": round(wall, 3), "busy_cpu_s": round(busy_s, 3),
               "utilization": round((busy1 - busy0) / max(1, total1 - total0), 3)}
        if ours is not None:
            harness = self_cpu() - self.self_start
            foreign = max(0.0, busy_s - sum(v for v in ours.values() if v) - harness)
            out.update(harness_cpu_s=round(harness, 3), foreign_cpu_s=round(foreign, 3),
                       foreign_share=round(foreign / (wall * (os.cpu_count() or 1)), 3))
        return out

    def stop(self):
        self.sample()
        self.stop_flag.set()
        self.thread.join()


# --- processes ---------------------------------------------------------------

def as_postgres(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if IS_ROOT else cmd


class Postgres:
    # Every client (psql, pgbench, pg_recvlogical, walcast) connects through
    # the Unix socket instead of TCP on 127.0.0.1 (--pg-unix-socket).
    unix_socket = False
    # Postgres runs in a network namespace of its own and every client
    # reaches it over a veth pair, as from another container or a pod on the
    # same node (--pg-veth): the namespace's name, or None.
    veth_namespace = None

    def __init__(self, work, pg_bin, fsync=True):
        """A new cluster in work/pg, or the one already there (a kept catch-up dataset)."""
        self.bin = Path(pg_bin)
        self.dir = work / "pg"
        self.data = self.dir / "data"
        self.port = free_port()
        self.existed = (self.data / "PG_VERSION").exists()
        if not self.existed:
            self.dir.mkdir()
            if IS_ROOT:
                shutil.chown(self.dir, "postgres", "postgres")
            subprocess.run(as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                        "--auth=trust", "-E", "UTF8", "--locale=C"]),
                           check=True, stdout=subprocess.DEVNULL)
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "shared_buffers": "512MB",
            "max_wal_size": "16GB",
            "checkpoint_timeout": "1h",
            "wal_sender_timeout": "120s",
            # Updates would otherwise trigger autovacuum in the middle of a timed run.
            "autovacuum": "off",
            "fsync": "on" if fsync else "off",
            "synchronous_commit": "on",
        }
        conf = "".join(f"{k} = {v}\n" for k, v in settings.items())
        conf_path = self.data / "postgresql.conf"
        subprocess.run(as_postgres(["sh", "-c", f"cat >> '{conf_path}'"]), input=conf.encode(), check=True)
        if Postgres.veth_namespace:
            hba = f"host all all {VETH_NET}.0/24 trust\nhost replication all {VETH_NET}.0/24 trust\n"
            subprocess.run(as_postgres(["sh", "-c", f"cat >> '{self.data / 'pg_hba.conf'}'"]),
                           input=hba.encode(), check=True)
        self.settings = settings

    @property
    def host(self):
        return f"{VETH_NET}.2" if Postgres.veth_namespace else "127.0.0.1"

    def start(self):
        in_namespace = ["ip", "netns", "exec", Postgres.veth_namespace] if Postgres.veth_namespace else []
        subprocess.run(in_namespace + as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                                                   str(self.dir / "postgres.log"), "-w", "-t", "120", "start"]),
                       check=True, stdout=subprocess.DEVNULL)
        STARTED.append(("pg", self))

    def stop(self):
        subprocess.run(as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                                    "-t", "120", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self):
        if Postgres.unix_socket:
            return f"postgres://postgres@/postgres?host={self.dir}&port={self.port}"
        return f"postgres://postgres@{self.host}:{self.port}/postgres"

    def sql(self, query, env=None):
        out = subprocess.run([str(self.bin / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", self.url,
                              "-c", query], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed: {query[:200]}\n{out.stderr}")
        return out.stdout.strip()

    def sql_file(self, path):
        subprocess.run([str(self.bin / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", self.url, "-f",
                        str(path)], check=True, stdout=subprocess.DEVNULL)

    def lsn(self):
        return self.sql("SELECT pg_current_wal_lsn()")

    def create_slot(self, name):
        self.sql(f"SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')")

    def drop_slot(self, name):
        self.sql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 f"WHERE slot_name = '{name}'")

    def slot_pid(self, name):
        out = self.sql(f"SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{name}'")
        return int(out) if out else None


def find_walsender(pg, slot, sampler, stop, name="walsender"):
    """Background: once `slot` is active, watch its walsender process."""

    def run():
        while not stop.is_set():
            try:
                pid = pg.slot_pid(slot)
            except RuntimeError:
                pid = None
            if pid:
                sampler.watch(name, pid)
                return
            stop.wait(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class NatsServer:
    def __init__(self, work, binary, name, keep_store=False):
        """keep_store: the JetStream store outlives stop() (and may exist already)."""
        self.dir = work / f"nats-{name}"
        self.keep_store = keep_store
        self.dir.mkdir(exist_ok=keep_store)
        self.port = free_port()
        conf = self.dir / "nats.conf"
        conf.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                        f'jetstream {{\n  store_dir: "{self.dir / "js"}"\n}}\n')
        self.log = open(self.dir / "nats.log", "wb")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        STARTED.append(("proc", self.proc))
        wait_port(self.port)
        self.nc = Nats("127.0.0.1", self.port)

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def stop(self):
        try:
            self.nc.close()
        except OSError:
            pass
        stop_proc(self.proc)
        self.log.close()
        if not self.keep_store:
            shutil.rmtree(self.dir / "js", ignore_errors=True)


def stop_proc(proc, timeout=30):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Walcast:
    def __init__(self, binary, work, pg, nats, slot, confirm_delay=None, dry_run=False, extra_env=None,
                 name=None):
        self.http = f"127.0.0.1:{free_port()}"
        env = dict(os.environ)
        env.update({
            "WALCAST_DATABASE_URL": pg.url,
            "WALCAST_NATS_URL": nats.url,
            "WALCAST_HTTP_ADDR": self.http,
            "WALCAST_SLOT": slot,
        })
        if confirm_delay is not None:
            env["WALCAST_CONFIRM_DELAY"] = confirm_delay
        if dry_run:
            env["WALCAST_DRY_RUN"] = "true"
        env.update(extra_env or {})
        self.logpath = work / f"walcast-{name or slot}.log"
        self.log = open(self.logpath, "ab")
        self.proc = subprocess.Popen([binary, "run"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        STARTED.append(("proc", self.proc))

    @property
    def pid(self):
        return self.proc.pid

    def _get(self, path, timeout=2.0):
        with urllib.request.urlopen(f"http://{self.http}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()

    def ready(self):
        try:
            return self._get("/readyz")[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"walcast exited ({self.proc.returncode}); see {self.logpath}")
            if self.ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"walcast not ready after {timeout}s; see {self.logpath}")

    def metrics(self):
        """Prometheus text → {name: sum over label sets}."""
        try:
            text = self._get("/metrics")[1]
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
        return out

    def stop(self):
        stop_proc(self.proc)
        self.log.close()
        return self.proc.returncode


# --- workloads -----------------------------------------------------------------

def run_load(pg, n_changes, prefix, tenants, seed, workers=2, hot_frac=0.0):
    """bench_load in `workers` concurrent sessions over disjoint tenant ranges.
    Returns (changes, transactions, seconds). The backlog's event count is
    `changes`: one event per row change."""
    env = dict(os.environ, PGOPTIONS="-c synchronous_commit=off")
    procs = []
    t0 = time.monotonic()
    per = n_changes // workers
    span = tenants // workers
    for w in range(workers):
        n = per if w < workers - 1 else n_changes - per * (workers - 1)
        lo = 1 + w * span
        hi = 1 + (w + 1) * span if w < workers - 1 else tenants + 1
        q = (f"CALL bench_load({n}, '{prefix}', {lo}, {hi}, {(seed + w * 0.01) % 1:.4f}, "
             f"{hot_frac}, 'w{w}')")
        procs.append(subprocess.Popen([str(pg.bin / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", pg.url,
                                       "-c", q], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env))
    changes = txns = 0
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"load failed: {err}")
        c, t = out.strip().split("|")
        changes += int(c)
        txns += int(t)
    return changes, txns, time.monotonic() - t0


def backlog_end(pg):
    """A WAL position after the whole load: pg_recvlogical --endpos target."""
    pg.sql("CHECKPOINT")
    return pg.lsn()


def wal_bytes(pg, a, b):
    return int(float(pg.sql(f"SELECT pg_wal_lsn_diff('{b}', '{a}')")))


# --- drain runs ----------------------------------------------------------------

def log_tail(path):
    """The last line of a log, without ANSI colours."""
    import re
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[-1])[-300:] if lines else ""


def per_million(cpu, events):
    return None if cpu is None or not events else round(cpu / events * 1e6, 2)


def drain_recvlogical(ctx, slot, endpos, events, wal):
    pg = ctx.pg
    s = Sampler()
    stop = threading.Event()
    t0 = time.monotonic()
    p = subprocess.Popen([str(pg.bin / "pg_recvlogical"), "-d", pg.url, "--slot", slot, "--start",
                          "--endpos", endpos, "--no-loop", "-o", "proto_version=1",
                          "-o", "publication_names=walcast", "-o", "messages=true", "-f", "/dev/null"],
                         stderr=subprocess.PIPE)
    finder = find_walsender(pg, slot, s, stop)
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    finder.join()
    s.stop()
    err = p.stderr.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({p.returncode}): {err}")
    recv_cpu = ru.ru_utime + ru.ru_stime
    ws = s.cpu("walsender")
    mach = s.machine({"walsender": ws, "pg_recvlogical": recv_cpu})
    return {
        "seconds": round(secs, 3),
        "events_per_s": round(events / secs),
        "wal_mb_per_s": round(wal / secs / 1e6, 2),
        "cpu_s": {"pg_recvlogical": round(recv_cpu, 3), "walsender": ws},
        "cpu_s_per_1m_events": {"pg_recvlogical": per_million(recv_cpu, events),
                                "walsender": per_million(ws, events),
                                "total": per_million(recv_cpu + (ws or 0), events)},
        "machine": mach,
    }


def drain_walcast(ctx, slot, events, wal, confirm_delay=None, dry_run=False, name=None, perf=None, state=True,
                  binary=None, nats_bin=None):
    """Starts walcast on `slot` (fresh nats-server) and times it until the
    stream holds `events` messages and, with the state bucket on (SPEC §8),
    the bucket has applied them all (dry run: until it built them)."""
    pg = ctx.pg
    nats = NatsServer(ctx.work, nats_bin or ctx.nats_bin, name or slot)
    s = Sampler()
    s.watch("nats-server", nats.proc.pid)
    stop = threading.Event()
    binary = binary or ctx.walcast_bin
    counted = None
    if ctx.args.callgrind:
        binary, counted = under_callgrind(ctx, binary, name or slot)
    t0 = time.monotonic()
    wc = Walcast(binary, ctx.work, pg, nats, slot, confirm_delay=confirm_delay, dry_run=dry_run,
                 name=name, extra_env=None if state else {"WALCAST_STATE_BUCKET": ""})
    s.watch("walcast", wc.pid)
    finder = find_walsender(pg, slot, s, stop)
    perf_proc = None
    if perf:
        # --profile-system: every process on the machine (walcast, the
        # nats-server, the walsender), frame-pointer call graphs.
        target = (["-a", "-F", "999", "-g"] if ctx.args.profile_system
                  else ["-F", "499", "-g", "--call-graph", "dwarf,16384", "-p", str(wc.pid)])
        perf_proc = subprocess.Popen(["perf", "record", *target, "-o", str(perf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_at = None
    last = 0
    stalled = None
    progress = [0, time.monotonic()]
    deadline = t0 + ctx.args.drain_timeout
    while time.monotonic() < deadline:
        if wc.proc.poll() is not None:
            raise RuntimeError(f"walcast exited ({wc.proc.returncode}); see {wc.logpath}")
        if dry_run:
            last = int(wc.metrics().get("walcast_events_built_total", 0))
        else:
            info = stream_info(nats.nc, "WALCAST")
            last = info["state"]["last_seq"] if info else 0
            if state and last >= events:
                last = int(wc.metrics().get("walcast_state_applied_stream_seq", 0))
        if last >= events:
            done_at = time.monotonic()
            break
        now = time.monotonic()
        if last != progress[0]:
            progress[:] = [last, now]
        elif now - progress[1] > ctx.args.stall_timeout:
            stalled = f"stalled at {last}/{events} events for {ctx.args.stall_timeout}s"
            break
        time.sleep(0.05)
    s.sample()
    secs = (done_at or time.monotonic()) - t0
    cpu = {k: s.cpu(k) for k in ("walcast", "nats-server", "walsender")}
    mach = s.machine(cpu)
    hwm = proc_status_mb(wc.pid, "VmHWM")
    metrics = wc.metrics()
    if perf_proc:
        perf_proc.send_signal(signal.SIGINT)
        perf_proc.wait()
    stop.set()
    finder.join()
    s.stop()
    rc = wc.stop()
    js = {} if dry_run else (stream_info(nats.nc, "WALCAST") or {}).get("state", {})
    nats.stop()
    if done_at is None:
        raise RuntimeError(f"walcast did not finish ({stalled or 'timeout'}): {last}/{events} events after "
                           f"{secs:.0f}s, exit code {rc} after SIGTERM (-9: it ignored SIGTERM for 30 s and was "
                           f"killed); log {wc.logpath} (kept with --keep), last line: {log_tail(wc.logpath)}")
    res = {
        "seconds": round(secs, 3),
        "events_per_s": round(events / secs),
        "wal_mb_per_s": round(wal / secs / 1e6, 2),
        "cpu_s": cpu,
        "cpu_s_per_1m_events": dict({k: per_million(v, events) for k, v in cpu.items()},
                                    total=per_million(sum(v or 0 for v in cpu.values()), events)),
        "peak_rss_mb": round(hwm, 1) if hwm else s.rss_peak.get("walcast"),
        "rss_series_mb": s.rss_series.get("walcast"),
        "exit_code": rc,
        "machine": mach,
    }
    if not dry_run:
        payload = metrics.get("walcast_event_bytes_total", 0)
        res["published_payload_mb_per_s"] = round(payload / secs / 1e6, 2)
        res["stream_bytes"] = js.get("bytes")
        res["stream_messages"] = js.get("messages")
        n = metrics.get("walcast_publish_ack_seconds_count", 0)
        if n:
            res["mean_publish_ack_ms"] = round(metrics.get("walcast_publish_ack_seconds_sum", 0) / n * 1000, 2)
    if counted:
        res["instructions_per_event"] = callgrind_per_event(counted, events)
    return res


def under_callgrind(ctx, binary, name):
    """A wrapper that runs `binary` under callgrind (same pid: valgrind runs
    the program in its own process), and the file its count goes to."""
    out = ctx.work / f"callgrind-{name}.out"
    wrapper = ctx.work / f"callgrind-{name}.sh"
    wrapper.write_text(f'#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out} {binary} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper), out


def callgrind_per_event(out, events):
    """walcast's instructions per event, start-up and shutdown included (a
    count, not a time: it does not move with the machine's other load)."""
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return round(int(line.split()[1]) / events)
    return None


def backlog(ctx, slots, n, prefix, tenants, seed):
    pg = ctx.pg
    for sl in slots:
        pg.create_slot(sl)
    start = pg.lsn()
    changes, txns, secs = run_load(pg, n, prefix, tenants, seed)
    end = backlog_end(pg)
    wal = wal_bytes(pg, start, end)
    log(f"  load: {changes} row changes in {txns} transactions, {wal / 1e6:.0f} MB WAL, {secs:.0f}s")
    return {"events": changes, "transactions": txns, "tenants": tenants, "wal_bytes": wal,
            "load_seconds": round(secs, 1)}, end


# --- scenarios -------------------------------------------------------------------

def attempt(label, fn, *args, **kw):
    """One timed run; a failure is recorded (and logged), not fatal to the scenario."""
    log(f"  {label}")
    try:
        r = fn(*args, **kw)
        log(f"    {r['events_per_s']} events/s" + (f", peak RSS {r['peak_rss_mb']} MB" if 'peak_rss_mb' in r else ""))
        return r
    except Exception as e:  # noqa: BLE001
        log(f"    FAILED: {e}")
        return {"error": str(e)}


def rate(run):
    return None if not run or "error" in run else run["events_per_s"]


def ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def best(runs):
    """The run with the highest rate (the least disturbed by other load), plus
    every run's rate; or the first failure if none succeeded."""
    ok = [r for r in runs if rate(r)]
    if not ok:
        return dict(runs[0]) if runs else {"error": "not run"}
    top = dict(max(ok, key=rate))
    rates = sorted(rate(r) for r in ok)
    top["all_rates"] = [rate(r) for r in ok]
    top["median_rate"] = rates[len(rates) // 2]
    top["spread"] = round((rates[-1] - rates[0]) / rates[-1], 3)
    top["failed_runs"] = len(runs) - len(ok)
    return top


def drain_rounds(ctx, prefix, kinds):
    """Creates the slots of every run before the load, so all of them hold
    the same backlog. Each kind runs `repeat` times, interleaved (a baseline
    first, and one more at the end), so slow phases of foreign load hit all
    kinds alike."""
    a = ctx.args
    runs = {k: [] for k in ["baseline"] + [k for k, _ in kinds]}
    slots = []
    for i in range(a.repeat + 1):
        for kind, kw in [("baseline", None)] + (kinds if i < a.repeat else []):
            slot = f"{prefix}_{kind}_{i}"
            slots.append(slot)
    for sl in slots:
        ctx.pg.create_slot(sl)
    return runs, slots


def run_rounds(ctx, prefix, end, ev, wal, kinds, runs):
    a = ctx.args
    for i in range(a.repeat + 1):
        for kind, kw in [("baseline", None)] + (kinds if i < a.repeat else []):
            slot = f"{prefix}_{kind}_{i}"
            tag = f"[{i + 1}/{a.repeat}]" if kind != "baseline" else f"[{i + 1}/{a.repeat + 1}]"
            if kind == "baseline":
                runs[kind].append(attempt(f"pg_recvlogical {tag}", drain_recvlogical, ctx, slot, end, ev, wal))
            else:
                runs[kind].append(attempt(f"walcast {kind} {tag}", drain_walcast, ctx, slot, ev, wal, **kw))
        ctx.pg.sql("CHECKPOINT")
    return {k: best(v) for k, v in runs.items()}, runs


def scenario_drain(ctx):
    """1 (+1b dry run, +1c --confirm-delay 0, +3 peak RSS)."""
    a = ctx.args
    n = a.rows
    log(f"scenario 1: backlog drain, {n} row changes, {a.tenants} tenants, {a.repeat} round(s)")
    kinds = [("default", {}), ("no_state", {"state": False}), ("dry_run", {"dry_run": True}),
             ("confirm_delay_0", {"confirm_delay": "0"})]
    if a.compare_bin:
        # An A/B of two builds on the same backlog, interleaved with the rest.
        kinds += [("compare", {"binary": a.compare_bin}),
                  ("compare_no_state", {"binary": a.compare_bin, "state": False}),
                  ("compare_dry_run", {"binary": a.compare_bin, "dry_run": True})]
    if a.compare_nats:
        # The same walcast against another nats-server build, interleaved.
        kinds += [("compare_nats", {"nats_bin": a.compare_nats}),
                  ("compare_nats_no_state", {"nats_bin": a.compare_nats, "state": False})]
    runs, slots = drain_rounds(ctx, "d1", kinds)
    if a.profile:
        ctx.pg.create_slot("wc_perf")
    data, end = backlog(ctx, [], n, "t", a.tenants, 0.42)
    ev, wal = data["events"], data["wal_bytes"]
    bests, runs = run_rounds(ctx, "d1", end, ev, wal, kinds, runs)
    r = {"backlog": data, "baseline": bests["baseline"], "walcast": bests["default"],
         "walcast_no_state": bests["no_state"], "walcast_dry_run": bests["dry_run"],
         "walcast_confirm_delay_0": bests["confirm_delay_0"], "runs": runs}
    if a.profile:
        log("  walcast under perf record (not timed)")
        perf_data = ctx.work / "perf.data"
        try:
            drain_walcast(ctx, "wc_perf", ev, wal, perf=perf_data, state=not a.profile_no_state)
            r["profile"] = perf_report(perf_data, ctx.results_dir / "profile-drain.txt", a.profile_system)
        except Exception as e:  # noqa: BLE001
            r["profile"] = {"error": str(e)}
        slots.append("wc_perf")
    for sl in slots:
        ctx.pg.drop_slot(sl)
    base = rate(r["baseline"])
    r["baseline_events_per_s"] = base
    r["ratio"] = ratio(rate(r["walcast"]), base)
    r["ratio_no_state"] = ratio(rate(r["walcast_no_state"]), base)
    r["ratio_dry_run"] = ratio(rate(r["walcast_dry_run"]), base)
    r["ratio_confirm_delay_0"] = ratio(rate(r["walcast_confirm_delay_0"]), base)
    r["confirm_delay_slowdown"] = ratio(rate(r["walcast"]), rate(r["walcast_confirm_delay_0"]))
    r["cpu_cost_ratio"] = cpu_cost_ratio(r["baseline"], r["walcast"])
    r["cpu_cost_ratio_dry_run"] = cpu_cost_ratio(r["baseline"], r["walcast_dry_run"])
    return r


def cpu_cost_ratio(base, run):
    """pg_recvlogical's CPU per event (walsender + client) over walcast's
    (walcast + nats-server + walsender): a noise-robust companion of the rate
    ratio — CPU time barely changes when other load steals the cores."""
    b, w = g(base, "cpu_s_per_1m_events", "total"), g(run, "cpu_s_per_1m_events", "total")
    return None if not b or not w else round(b / w, 3)


def perf_report(perf_data, out_path, by_process=False):
    sort = "comm,dso,symbol" if by_process else "dso,symbol"
    rep = subprocess.run(["perf", "report", "-i", str(perf_data), "--no-children", "--sort", sort,
                          "--stdio", "--percent-limit", "0.5", "-g", "none"], capture_output=True, text=True)
    out_path.write_text(rep.stdout)
    top = []
    for line in rep.stdout.splitlines():
        line = line.strip()
        if line and line[0].isdigit() and "%" in line:
            top.append(" ".join(line.split()))
    try:
        where = str(out_path.relative_to(ROOT))
    except ValueError:
        where = str(out_path)
    return {"file": where, "top": top[:25]}


def scenario_tenants(ctx, drain_result):
    a = ctx.args
    n = a.rows
    log(f"scenario 4: backlog drain, {n} row changes, {a.tenants_large} tenants, {a.repeat} round(s)")
    kinds = [("default", {})]
    runs, slots = drain_rounds(ctx, "d4", kinds)
    data, end = backlog(ctx, [], n, "u", a.tenants_large, 0.43)
    ev, wal = data["events"], data["wal_bytes"]
    bests, runs = run_rounds(ctx, "d4", end, ev, wal, kinds, runs)
    r = {"backlog": data, "baseline": bests["baseline"], "walcast": bests["default"], "runs": runs}
    for sl in slots:
        ctx.pg.drop_slot(sl)
    base = rate(r["baseline"])
    r["baseline_events_per_s"] = base
    r["ratio_vs_pg_recvlogical"] = ratio(rate(r["walcast"]), base)
    r["cpu_cost_ratio"] = cpu_cost_ratio(r["baseline"], r["walcast"])
    if drain_result and "error" not in drain_result:
        r["ratio_vs_1k_tenants"] = ratio(rate(r["walcast"]), rate(drain_result.get("walcast")))
        # Each run normalized by its own baseline (cancels machine drift between the two runs).
        r["normalized_ratio_vs_1k_tenants"] = ratio(r["ratio_vs_pg_recvlogical"], drain_result.get("ratio"))
        # walcast's own CPU per event, 1k vs large tenant count.
        w1 = g(drain_result, "walcast", "cpu_s_per_1m_events", "walcast")
        w2 = g(r, "walcast", "cpu_s_per_1m_events", "walcast")
        r["walcast_cpu_per_event_ratio_vs_1k_tenants"] = ratio(w1, w2)
    return r


def scenario_big_tx(ctx):
    a = ctx.args
    n = a.big_tx_rows
    log(f"scenario 3b: one transaction of {n} rows")
    pg = ctx.pg
    pg.create_slot("wc_big")
    start = pg.lsn()
    t0 = time.monotonic()
    pg.sql(f"INSERT INTO tasks (id, tenant_id, title, description, priority, metadata) "
           f"SELECT gen_random_uuid(), 'big' || (g % 1000), 'Bulk task ' || g, repeat('x', 100), g % 4, "
           f"'{{\"bulk\": true}}' FROM generate_series(1, {n}) g",
           env=dict(os.environ, PGOPTIONS="-c synchronous_commit=off"))
    load_s = time.monotonic() - t0
    end = backlog_end(pg)
    wal = wal_bytes(pg, start, end)
    log(f"  load: {wal / 1e6:.0f} MB WAL in {load_s:.0f}s")
    res = drain_walcast(ctx, "wc_big", n, wal, name="big")
    pg.drop_slot("wc_big")
    series = res.get("rss_series_mb") or []
    if len(series) >= 4:
        # "No growth with transaction size": RSS a quarter of the way through vs at the end.
        q = series[len(series) // 4][1]
        res["rss_quarter_mb"], res["rss_end_mb"] = q, series[-1][1]
        res["rss_growth_last_three_quarters_mb"] = round(series[-1][1] - q, 1)
    log(f"    walcast {res['events_per_s']} events/s, peak RSS {res['peak_rss_mb']} MB")
    return {"rows": n, "wal_bytes": wal, "walcast": res}


def scenario_backfill(ctx):
    """SPEC §8 backfill: rows written before the slot existed, copied into
    the state bucket; rows/s and walcast's peak RSS (flat in the row count)."""
    a = ctx.args
    n = a.backfill_rows
    log(f"scenario 8: backfill of {n} pre-existing rows")
    pg = ctx.pg
    pg.sql(f"INSERT INTO tasks (id, tenant_id, title, description, priority, metadata) "
           f"SELECT gen_random_uuid(), 'bf' || (g % 1000), 'Old task ' || g, repeat('x', 100), g % 4, "
           f"'{{\"old\": true}}' FROM generate_series(1, {n}) g",
           env=dict(os.environ, PGOPTIONS="-c synchronous_commit=off"))
    total = int(pg.sql("SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM projects) "
                       "+ (SELECT count(*) FROM editing_locks)"))
    pg.create_slot("wc_backfill")
    nats = NatsServer(ctx.work, ctx.nats_bin, "backfill")
    s = Sampler()
    s.watch("nats-server", nats.proc.pid)
    t0 = time.monotonic()
    wc = Walcast(ctx.walcast_bin, ctx.work, pg, nats, "wc_backfill", name="backfill")
    s.watch("walcast", wc.pid)
    done_at = None
    while time.monotonic() - t0 < a.drain_timeout:
        m = wc.metrics()
        if m.get("walcast_state_backfill_rows_total", 0) >= total and m.get("walcast_state_backfill_running") == 0:
            done_at = time.monotonic()
            break
        time.sleep(0.1)
    s.sample()
    secs = (done_at or time.monotonic()) - t0
    cpu = {k: s.cpu(k) for k in ("walcast", "nats-server")}
    hwm = proc_status_mb(wc.pid, "VmHWM")
    s.stop()
    wc.stop()
    nats.stop()
    pg.drop_slot("wc_backfill")
    if done_at is None:
        raise RuntimeError(f"the backfill did not complete in {a.drain_timeout}s; log {wc.logpath}")
    res = {"rows": total, "seconds": round(secs, 2), "rows_per_s": round(total / secs), "cpu_s": cpu,
           "peak_rss_mb": round(hwm, 1) if hwm else None}
    log(f"    {total} rows in {secs:.1f}s ({res['rows_per_s']} rows/s), peak RSS {res['peak_rss_mb']} MB")
    return res


def scenario_state_load(ctx):
    """SPEC §6/§8 initial state: a tenant with 10,000 rows and one with
    100,000 rows (among 100,000 rows of 1,000 other tenants), backfilled by
    walcast; the Rust client's load (every row decoded, with its as_of_seq)
    timed by clients/rust/examples/state_load, p50/p99 of repeated loads."""
    a = ctx.args
    loader = ROOT / "target/release/examples/state_load"
    if not loader.exists():
        raise RuntimeError(f"no loader at {loader}: cargo build --release -p walcast-client --example state_load")
    log("scenario 9: load a tenant's state (10,000 and 100,000 rows)")
    pg = ctx.pg
    sizes = {"load10k": 10_000, "load100k": 100_000}
    for tenant, n in sizes.items():
        pg.sql(f"INSERT INTO tasks (id, tenant_id, title, description, priority, metadata) "
               f"SELECT gen_random_uuid(), '{tenant}', 'Task ' || g, repeat('x', 100), g % 4, "
               f"'{{\"board\": 1}}' FROM generate_series(1, {n}) g")
    pg.sql("INSERT INTO tasks (id, tenant_id, title, priority) "
           "SELECT gen_random_uuid(), 'other' || (g % 1000), 'Task ' || g, 1 FROM generate_series(1, 100000) g")
    total = int(pg.sql("SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM projects) "
                       "+ (SELECT count(*) FROM editing_locks)"))
    pg.create_slot("wc_state_load")
    nats = NatsServer(ctx.work, ctx.nats_bin, "state_load")
    wc = Walcast(ctx.walcast_bin, ctx.work, pg, nats, "wc_state_load", name="state_load")
    try:
        deadline = time.monotonic() + a.drain_timeout
        while True:
            m = wc.metrics()
            if m.get("walcast_state_backfill_rows_total", 0) >= total and m.get("walcast_state_backfill_running") == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backfill did not complete; log {wc.logpath}")
            time.sleep(0.2)
        res = {"rows_in_bucket": total}
        for tenant, n in sizes.items():
            loads = 30 if n <= 10_000 else 10
            before = loadavg()
            out = subprocess.run([str(loader), nats.url, "--no-fill", "--tenant", tenant, "--rows", str(n),
                                  "--loads", str(loads)], capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"loader failed: {out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["load_avg_before"] = before
            res[f"rows_{n}"] = r
            log(f"    {n} rows: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms over {loads} loads")
            res[f"rows_{n}_typescript"] = ts_state_load(nats.url, tenant, n, loads)
        return res
    finally:
        wc.stop()
        nats.stop()
        pg.drop_slot("wc_state_load")
        pg.sql("DELETE FROM tasks WHERE tenant_id IN ('load10k', 'load100k') OR tenant_id LIKE 'other%'")


def ts_floor_note(r):
    """For a TypeScript load: its first (cold) load and nats.js' own floor."""
    floor = r.get("floor")
    if not floor or "error" in floor:
        return ""
    return (f"first load {r.get('first_ms')} ms; nats.js alone (no decoding) p50 {floor['p50_ms']} ms, "
            f"first {floor['first_ms']} ms (through consume(): p50 {floor.get('consume_p50_ms')}, "
            f"first {floor.get('consume_first_ms')}); ")


def ts_state_load(url, tenant, rows, loads):
    """The TypeScript client's load of the same tenant
    (clients/typescript/examples/state-load.mjs; scripts/bench.sh builds it)."""
    client = ROOT / "clients/typescript"
    if not (client / "dist/index.js").exists() or not shutil.which("node"):
        return {"error": "not run: no node, or the TypeScript client is not built (npm ci && npm run build)"}
    before = loadavg()
    out = subprocess.run(["node", "examples/state-load.mjs", url, "--tenant", tenant, "--rows", str(rows),
                          "--loads", str(loads)], cwd=client, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": f"TypeScript loader failed: {out.stderr[-2000:]}"}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["load_avg_before"] = before
    r["first_ms"] = r["each_ms"][0] if r.get("each_ms") else None
    log(f"    {rows} rows (TypeScript): p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms over {loads} loads "
        f"(the first, before V8 optimizes: {r['first_ms']} ms)")
    # The transport's floor: nats.js receiving the same keys, nothing decoded.
    floor = subprocess.run(["node", "examples/state-floor.mjs", url, "--tenant", tenant, "--loads", str(loads)],
                           cwd=client, capture_output=True, text=True, timeout=600)
    if floor.returncode == 0:
        r["floor"] = json.loads(floor.stdout.strip().splitlines()[-1])
        log(f"    {rows} rows (nats.js alone, no decoding): p50 {r['floor']['p50_ms']} ms, "
            f"first {r['floor']['first_ms']} ms; through consume() p50 {r['floor'].get('consume_p50_ms')} ms, "
            f"first {r['floor'].get('consume_first_ms')} ms")
    else:
        r["floor"] = {"error": f"floor reader failed: {floor.stderr[-2000:]}"}
    return r


DEMO_KEYS = ROOT / "deploy/compose"


def callout_nats(ctx, name):
    """A nats-server configured as deploy/nats/auth-callout.conf with the
    compose file's demo keys, JetStream on, its client and WebSocket ports
    free. Returns (process, client port, WebSocket port, walcast's NATS URL)."""
    import re
    compose = (ROOT / "docker-compose.yml").read_text()
    nats_env = {k: re.search(rf"{k}: (\S+)", compose).group(1)
                for k in ("NATS_PASSWORD_FOR_WALCAST", "NATS_AUTH_ISSUER", "NATS_AUTH_XKEY")}
    d = ctx.work / name
    d.mkdir()
    port, ws_port = free_port(), free_port()
    conf = (ROOT / "deploy/nats/auth-callout.conf").read_text().replace("port: 8080", f"port: {ws_port}")
    (d / "nats.conf").write_text(conf)
    with open(d / "nats.log", "wb") as nlog:
        nats = subprocess.Popen([ctx.nats_bin, "-c", str(d / "nats.conf"), "-js", "-sd", str(d / "js"),
                                 "-a", "127.0.0.1", "-p", str(port)], env=dict(os.environ, **nats_env),
                                stdout=nlog, stderr=subprocess.STDOUT)
    STARTED.append(("proc", nats))
    wait_port(port)
    return nats, port, ws_port, f"nats://walcast:{nats_env['NATS_PASSWORD_FOR_WALCAST']}@127.0.0.1:{port}"


def wait_log(path, needle, proc, timeout=30):
    """Waits until the log at `path` (of `proc`) contains `needle`."""
    deadline = time.monotonic() + timeout
    while needle.encode() not in path.read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"no {needle!r} in {path} after {timeout}s (exit code {proc.poll()})")
        time.sleep(0.1)


def callout_env(nats_url):
    """walcast's settings to answer the callout of callout_nats' server."""
    return dict(WALCAST_NATS_URL=nats_url, WALCAST_AUTH_ACCOUNT="APP",
                WALCAST_AUTH_ISSUER_SEED_FILE=str(DEMO_KEYS / "demo-auth-issuer.nk"),
                WALCAST_AUTH_XKEY_SEED_FILE=str(DEMO_KEYS / "demo-auth-xkey.xk"),
                WALCAST_AUTH_TOKEN_SECRET_FILE=str(DEMO_KEYS / "demo-app-jwt-secret"))


def scenario_auth_logins(ctx):
    """Issue 20 / SPEC §9: `walcast auth` answering the callout of a
    nats-server configured like deploy/nats/auth-callout.conf (the compose
    file's demo keys); 1,000 NATS clients log in at once with HS256 tokens of
    10 tenants (bench/logins.py), three rounds. Logins/s, latency from TCP
    connect to PONG, CPU of walcast and nats-server."""
    import asyncio
    import logins
    a = ctx.args
    log(f"scenario 10: {a.logins} concurrent auth callout logins, 3 rounds")
    nats, port, _, nats_url = callout_nats(ctx, "nats-auth")
    wlog_path = ctx.work / "walcast-auth.log"
    wlog = open(wlog_path, "wb")
    wenv = dict(os.environ, WALCAST_HTTP_ADDR=f"127.0.0.1:{free_port()}", **callout_env(nats_url))
    auth = subprocess.Popen([ctx.walcast_bin, "auth"], env=wenv, stdout=wlog, stderr=subprocess.STDOUT)
    STARTED.append(("proc", auth))
    try:
        wait_log(wlog_path, "auth callout answering", auth)
        secret = (DEMO_KEYS / "demo-app-jwt-secret").read_bytes().rstrip()
        rounds = []
        for _ in range(3):
            c0 = {"walcast": proc_cpu(auth.pid), "nats-server": proc_cpu(nats.pid)}
            r = asyncio.run(logins.run("127.0.0.1", port, secret, a.logins, a.logins))
            r["cpu_s"] = {k: round(proc_cpu(p) - c0[k], 2) for k, p in (("walcast", auth.pid), ("nats-server", nats.pid))}
            r["load_avg_after"] = loadavg()
            rounds.append(r)
            log(f"    {r['logins']} logins in {r['seconds']} s ({r['logins_per_s']}/s), p50 {r['p50_ms']} ms, "
                f"p99 {r['p99_ms']} ms, failed {r['refused_or_failed']}, cpu {r['cpu_s']}")
        return {"rounds": rounds, "best": min(rounds, key=lambda r: r["p99_ms"] or 1e9)}
    finally:
        stop_proc(auth)
        stop_proc(nats)
        wlog.close()


def wait_backfill(wc):
    """Waits until walcast's state backfill (SPEC §8) of rows earlier
    scenarios left is done: not running, and no row copied for 2 s (it may
    not have begun). Returns (seconds waited, rows copied)."""
    t0, last, still = time.monotonic(), None, 0
    while time.monotonic() - t0 < 1800 and wc.proc.poll() is None and still < 4:
        m = wc.metrics()
        rows = m.get("walcast_state_backfill_rows_total", 0)
        still = still + 1 if rows == last and m.get("walcast_state_backfill_running", 0) == 0 else 0
        last = rows
        time.sleep(0.5)
    waited = round(time.monotonic() - t0, 1)
    if last:
        log(f"    waited {waited}s for the state backfill of {int(last)} rows left by earlier scenarios")
    return waited, int(last or 0)


STEADY_SCRIPT = """\\set t random(1, {tenants})
INSERT INTO tasks (id, tenant_id, title, priority) VALUES (gen_random_uuid(), 'st' || :t, 'c' || :client_id, 1);
"""


def settled_walcast(ctx, name):
    """A walcast on a fresh slot `wc_<name>` and nats-server, ready and done
    with the state backfill of the rows earlier scenarios left (big_tx: 5M):
    that backfill is work, not what scenarios `idle` and `steady` measure.
    Returns (nats, wc, seconds waited for the backfill)."""
    ctx.pg.create_slot(f"wc_{name}")
    nats = NatsServer(ctx.work, ctx.nats_bin, name)
    wc = Walcast(ctx.walcast_bin, ctx.work, ctx.pg, nats, f"wc_{name}")
    wc.wait_ready()
    backfill_s, _ = wait_backfill(wc)
    return nats, wc, backfill_s


def stop_settled(ctx, name, nats, wc):
    wc.stop()
    nats.stop()
    ctx.pg.drop_slot(f"wc_{name}")


def scenario_steady(ctx):
    """SPEC §6 "RSS <= 50 MB steady state" with every one of --tenants-large
    tenants active: single-row commits at --steady-rate for --steady-seconds,
    longer than the confirm delay plus a bucket (2m30s at the default), so
    the confirm queue holds as many buckets as it ever will, and (600 s by
    default) long enough for the catch-up index to fill its exact-position
    budget (~1M events with 100,000 tenants)."""
    a = ctx.args
    log(f"scenario 13: steady load, {a.steady_rate}/s over {a.tenants_large} tenants for {a.steady_seconds}s")
    nats, wc, backfill_s = settled_walcast(ctx, "steady")
    s = Sampler(interval=1.0)
    s.watch("walcast", wc.pid)
    pgb = run_pgbench(ctx, a.steady_rate, a.steady_seconds, sql=STEADY_SCRIPT.format(tenants=a.tenants_large))
    pgb.pop("_schedule", None)
    s.stop()
    m = wc.metrics()
    res = {"rate": a.steady_rate, "seconds": a.steady_seconds, "tenants": a.tenants_large,
           "backfill_wait_s": backfill_s, "pgbench": pgb,
           "peak_rss_mb": round(proc_status_mb(wc.pid, "VmHWM") or 0, 1),
           "rss_mb": round(proc_status_mb(wc.pid, "VmRSS") or 0, 1),
           "rss_series_mb": s.rss_series.get("walcast", [])[::10],
           "index_mb": round(m.get("walcast_catchup_index_bytes", 0.0) / 1e6, 1)}
    stop_settled(ctx, "steady", nats, wc)
    log(f"    walcast peak RSS {res['peak_rss_mb']} MB, now {res['rss_mb']} MB "
        f"({pgb.get('tps')} tps, catch-up index {res['index_mb']} MB)")
    return res


def scenario_idle(ctx):
    a = ctx.args
    log(f"scenario 5: idle walcast for {a.idle_seconds}s")
    nats, wc, backfill_s = settled_walcast(ctx, "idle")
    s = Sampler(interval=0.5)
    s.watch("walcast", wc.pid, from_zero=False)
    s.watch("nats-server", nats.proc.pid, from_zero=False)
    ws = ctx.pg.slot_pid("wc_idle")
    if ws:
        s.watch("walsender", ws, from_zero=False)
    time.sleep(a.idle_seconds)
    s.stop()
    cpu = {k: s.cpu(k) for k in ("walcast", "nats-server", "walsender")}
    rss = proc_status_mb(wc.pid, "VmRSS")
    stop_settled(ctx, "idle", nats, wc)
    secs = a.idle_seconds
    log(f"    walcast {cpu['walcast']} CPU s in {secs}s")
    return {"seconds": secs, "cpu_s": cpu, "backfill_wait_s": backfill_s,
            "cpu_percent_of_one_core": {k: None if v is None else round(v / secs * 100, 3) for k, v in cpu.items()},
            "rss_mb": rss, "machine": s.machine(cpu)}


# The title names the pgbench client, so each event can be matched with the
# transaction in pgbench's log (-l) that wrote it, and its latency measured
# from the time pgbench had scheduled that transaction (see latency_part).
PGBENCH_SCRIPT = """\\set t random(1, 1000)
INSERT INTO tasks (id, tenant_id, title, priority) VALUES (gen_random_uuid(), 'lat' || :t, 'c' || :client_id, 1);
"""


def run_pgbench(ctx, rate, secs, sql=PGBENCH_SCRIPT):
    script = ctx.work / "latency.sql"
    script.write_text(sql)
    clients = 4 if rate <= 2000 else 16
    logdir = Path(tempfile.mkdtemp(prefix="pgbench.", dir=ctx.work))
    out = subprocess.run([str(ctx.pg.bin / "pgbench"), "-n", "-c", str(clients), "-j", "2", "-T", str(secs),
                          "-R", str(rate), "-f", str(script), "-l", f"--log-prefix={logdir}/tx", ctx.pg.url],
                         capture_output=True, text=True, env=dict(os.environ, PGOPTIONS="-c synchronous_commit=on"))
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {out.stderr}")
    # Per-transaction log: client_id tx_no latency_us script_no epoch_s epoch_us [schedule_lag_us], where
    # latency runs from the *scheduled* start (pgbench -R) to the end: scheduled = end - latency.
    schedule = {}
    for f in logdir.iterdir():
        for line in f.read_text().splitlines():
            p = line.split()
            if len(p) >= 6:
                end_us = int(p[4]) * 1_000_000 + int(p[5])
                schedule.setdefault(int(p[0]), []).append((int(p[1]), end_us - int(float(p[2]))))
    shutil.rmtree(logdir, ignore_errors=True)
    res = {"clients": clients, "_schedule": {c: [t for _, t in sorted(v)] for c, v in schedule.items()}}
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("number of transactions actually processed"):
            res["transactions"] = int(line.split(":")[1].split("/")[0])
        elif line.startswith("tps ="):
            res["tps"] = float(line.split()[2])
        elif line.startswith("latency average"):
            res["commit_latency_avg_ms"] = float(line.split()[3])
        elif line.startswith("rate limit schedule lag"):
            parts = line.replace("(", " ").replace(")", " ").split()
            res["schedule_lag_avg_ms"] = float(parts[parts.index("avg") + 1])
            res["schedule_lag_max_ms"] = float(parts[parts.index("max") + 1])
        elif line.startswith("number of transactions skipped"):
            res["skipped"] = line.split(":")[1].strip()
    return res


def wait_count(samples, n, timeout=15.0):
    deadline = time.monotonic() + timeout
    while len(samples) < n and time.monotonic() < deadline:
        time.sleep(0.05)


LATENCY_PROBE = ROOT / "target/release/examples/latency_probe"


class WalsenderLag:
    """How far a slot's walsender has decoded behind the flushed WAL, sampled
    every `interval` through one psql session: `pg_current_wal_flush_lsn() -
    sent_lsn` of `pg_stat_replication` (a logical walsender's `sent_lsn` is
    where its decoding stands). Converted to milliseconds with the run's WAL
    rate, it is the part of commit → receive spent before the reader gets the
    change: the walsender's queue, which grows when it waits for a CPU."""

    def __init__(self, pg, slot, interval=0.02):
        self.samples = []
        self.stop_flag = threading.Event()
        self.proc = subprocess.Popen([str(pg.bin / "psql"), "-XAtq", "-d", pg.url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        # Always exactly one row (psql prints nothing for none, and the
        # reader waits for a line): behind is empty while no walsender runs.
        self.query = ("SELECT (SELECT pg_current_wal_flush_lsn() - r.sent_lsn FROM pg_stat_replication r "
                      f"JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '{slot}'), "
                      "pg_current_wal_flush_lsn() - '0/0';\n")
        self.interval = interval
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag.is_set():
            try:
                self.proc.stdin.write(self.query)
                self.proc.stdin.flush()
                line = self.proc.stdout.readline().strip()
            except (BrokenPipeError, ValueError):
                return
            behind, _, flushed = line.partition("|")
            if behind and flushed:
                self.samples.append((time.monotonic(), int(behind), int(flushed)))
            time.sleep(self.interval)

    def stop(self):
        """Bytes behind (p50/p90/p99/max) and their equivalent in ms at the
        run's WAL rate."""
        self.stop_flag.set()
        self.thread.join(5)
        stop_proc(self.proc)
        if len(self.samples) < 2:
            return {"samples": len(self.samples)}
        (t0, _, w0), (t1, _, w1) = self.samples[0], self.samples[-1]
        rate = (w1 - w0) / max(t1 - t0, 1e-9)
        behind = sorted(b for _, b, _ in self.samples)
        out = {"samples": len(behind), "wal_bytes_per_s": round(rate)}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            b = behind[min(len(behind) - 1, int(len(behind) * q))]
            out[f"{name}_bytes"] = b
            out[f"{name}_ms"] = round(b / rate * 1000, 2) if rate else None
        return out


def latency_walcast(ctx, rate, secs, state=True, foreign_after=None):
    """walcast's commit → subscriber receive time, with the state bucket of
    SPEC §8 kept (the default) or off (`WALCAST_STATE_BUCKET=""`). With
    `foreign_after`, one message walcast did not publish goes into its stream
    that many seconds into the load (as a tenant user can make the server
    store one: README "Writes by delivery")."""
    pg = ctx.pg
    slot = f"wc_lat_{rate}"
    pg.create_slot(slot)
    name = f"lat{rate}{'' if state else '-nostate'}"
    nats = NatsServer(ctx.work, ctx.nats_bin, name)
    confirm_delay = ctx.args.foreign_confirm_delay if foreign_after is not None else None
    wc = Walcast(ctx.walcast_bin, ctx.work, pg, nats, slot, name=name, confirm_delay=confirm_delay,
                 extra_env=None if state else {"WALCAST_STATE_BUCKET": ""})
    wc.wait_ready()
    samples = []
    bad = [0]

    def on_msg(msg):
        ct, title = wire.event_fields(msg.payload)
        if ct is None:
            bad[0] += 1
        else:
            samples.append((ct, msg.recv_time * 1e6, title))

    probe = LATENCY_PROBE if ctx.args.latency_receiver == "rust" else None
    if probe:
        if not probe.exists():
            raise RuntimeError(f"no receiver at {probe}: cargo build --release -p walcast-client --example latency_probe")
        sub = subprocess.Popen([str(probe), nats.url, "--idle", "3" if foreign_after is None else "30"], stdout=subprocess.PIPE, text=True)
        STARTED.append(("proc", sub))
        if sub.stdout.readline().strip() != "ready":
            raise RuntimeError("the latency probe did not start")
    else:
        sub = Nats("127.0.0.1", nats.port)
        sub.subscribe("walcast.>", on_msg)
        sub.flush()
    s = Sampler(interval=0.25)
    s.watch("walcast", wc.pid, from_zero=False)
    s.watch("nats-server", nats.proc.pid, from_zero=False)
    walsender = WalsenderLag(pg, slot)
    time.sleep(0.5)
    injected = {}
    if foreign_after is not None:
        injection = threading.Timer(foreign_after, inject_foreign, (nats.port, injected))
        injection.start()
    pb = run_pgbench(ctx, rate, secs)
    walsender_lag = walsender.stop()
    if probe:
        out, _ = sub.communicate(timeout=300)  # it ends 3 s (30 s with foreign_after) after the last event
        for line in out.splitlines():
            ct, recv, title = json.loads(line)
            if ct:
                samples.append((ct, recv, title))
            else:
                bad[0] += 1
    else:
        wait_count(samples, pb.get("transactions", 0))
    s.stop()
    cpu = {k: s.cpu(k) for k in ("walcast", "nats-server")}
    hwm = proc_status_mb(wc.pid, "VmHWM")
    if foreign_after is not None:
        injected["counted"] = wc.metrics().get("walcast_stream_foreign_messages_total", 0)
    if not probe:
        sub.close()
    wc.stop()
    nats.stop()
    pg.drop_slot(slot)
    if os.environ.get("BENCH_DUMP_SAMPLES"):  # (commit µs, receive µs) per event, for a timeline
        with open(f"{os.environ['BENCH_DUMP_SAMPLES']}-{rate}-{'state' if state else 'nostate'}.json", "w") as f:
            json.dump([(c, r) for c, r, _ in samples], f)
    if foreign_after is not None:
        injected["after_it"] = stall_after(samples, injected.get("at_us"))
    return samples, {"pgbench": pb, "received": len(samples), "undecodable": bad[0], "cpu_s": cpu,
                     "walsender_behind": walsender_lag, "foreign": injected or None,
                     "peak_rss_mb": hwm, "machine": s.machine()}


def inject_foreign(port, out):
    """Publishes one message without an event id into the stream's subjects."""
    conn = Nats("127.0.0.1", port)
    out["at_us"] = time.time() * 1e6
    conn.publish("walcast.bench-foreign.task.created", b"")  # no event: the receivers count it as undecodable
    conn.flush()
    conn.close()


def stall_after(samples, at_us):
    """What the events committed in the 10 s after the injection waited:
    the worst commit → receive time, and how many took over 100 ms."""
    if at_us is None:
        return None
    late = [(recv - commit) / 1e3 for commit, recv, _ in samples if at_us <= commit < at_us + 10e6]
    return {"events": len(late), "max_ms": round(max(late, default=0), 1),
            "over_100ms": sum(1 for v in late if v > 100)}


def latency_floor(ctx, rate, secs):
    """pg_recvlogical's commit → receive time for the same writers: the floor
    walcast adds to."""
    pg = ctx.pg
    slot = f"recv_lat_{rate}"
    pg.create_slot(slot)
    samples = []
    p = subprocess.Popen([str(pg.bin / "pg_recvlogical"), "-d", pg.url, "--slot", slot, "--start", "--no-loop",
                          "-o", "proto_version=1", "-o", "publication_names=walcast", "-o", "messages=true",
                          "-f", "-"], stdout=subprocess.PIPE)
    state = {"now": 0.0}
    parser = wire.PgoutputCommits(lambda ct, title: samples.append((ct, state["now"] * 1e6, title)))

    def reader():
        fd = p.stdout.fileno()
        while True:
            data = os.read(fd, 1 << 20)
            if not data:
                return
            state["now"] = time.time()
            parser.feed(data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    walsender = WalsenderLag(pg, slot)
    time.sleep(1.0)
    pb = run_pgbench(ctx, rate, secs)
    walsender_lag = walsender.stop()
    wait_count(samples, pb.get("transactions", 0))
    stop_proc(p)
    t.join(5)
    pg.drop_slot(slot)
    return samples, {"pgbench": pb, "received": len(samples), "walsender_behind": walsender_lag}


def latency_part(label, fn, ctx, rate, secs, *fn_args):
    """Three views of one run's latencies:
    - raw: commit timestamp (from the event / the Commit message) → receive,
      every transaction one sample (SPEC §6's definition);
    - corrected: the same samples with HdrHistogram's coordinated-omission
      correction at the expected interval 1/rate (what issue 7 asks for; for an
      open-loop load it over-counts: a stall's real samples also get synthetic
      ones);
    - from_schedule: pgbench's *scheduled* start → receive, events matched
      with pgbench's per-transaction log by client and order: the CO-free
      figure for an open-loop load (includes the commit itself and any delay
      of the writers)."""
    log(label)
    interval = 1e6 / rate
    try:
        samples, info = fn(ctx, rate, secs, *fn_args)
    except Exception as e:  # noqa: BLE001
        log(f"    FAILED: {e}")
        return {"error": str(e)}
    schedule = info["pgbench"].pop("_schedule", {})
    raw = [recv - commit for commit, recv, _ in samples]
    by_client = {}
    for commit, recv, title in samples:
        if title and title.startswith("c") and title[1:].isdigit():
            by_client.setdefault(int(title[1:]), []).append((commit, recv))
    from_sched, unmatched = [], 0
    for c, evs in by_client.items():
        sched = schedule.get(c, [])
        evs.sort()
        if len(sched) != len(evs):
            unmatched += len(evs)
            continue
        from_sched.extend(recv - t for (_, recv), t in zip(evs, sched))
    out = dict(info, seconds=secs, raw=lat.summarize_raw(raw), corrected=lat.summarize_corrected(raw, interval),
               from_schedule=lat.summarize_raw(from_sched), unmatched_for_schedule=unmatched)
    sent = info["pgbench"].get("transactions", 0)
    out["missing"] = sent - len(samples)
    c, r_, f_ = out["corrected"], out["raw"], out["from_schedule"]
    log(f"    commit→receive p50 {r_.get('p50_ms')} p99 {r_.get('p99_ms')} max {r_.get('max_ms')} ms; "
        f"CO-corrected p50 {c.get('p50_ms')} p99 {c.get('p99_ms')}; from schedule p50 {f_.get('p50_ms')} "
        f"p99 {f_.get('p99_ms')} ({len(samples)}/{sent} received, pgbench {info['pgbench'].get('tps')} tps)")
    return out


def scenario_latency(ctx):
    a = ctx.args
    out = {}
    for rate_ in a.rates:
        r = {"rate": rate_}
        r["floor_pg_recvlogical"] = latency_part(f"scenario 2: {rate_}/s, pg_recvlogical floor ({a.floor_seconds}s)",
                                                 latency_floor, ctx, rate_, a.floor_seconds)
        if a.latency_state in ("on", "both"):
            r["walcast"] = latency_part(f"scenario 2: {rate_}/s, walcast ({a.latency_seconds}s)",
                                        latency_walcast, ctx, rate_, a.latency_seconds)
        if a.latency_state in ("off", "both"):
            r["walcast_no_state"] = latency_part(
                f"scenario 2: {rate_}/s, walcast without the state bucket ({a.latency_seconds}s)",
                latency_walcast, ctx, rate_, a.latency_seconds, False)
        for p in ("p50", "p99"):
            w, f = g(r, "walcast", "corrected", p + "_ms"), g(r, "floor_pg_recvlogical", "corrected", p + "_ms")
            r[f"walcast_minus_floor_{p}_ms"] = None if w is None or f is None else round(w - f, 3)
        out[str(rate_)] = r
    return out


def scenario_foreign(ctx):
    """What one message walcast did not publish costs every tenant: walcast
    restarts its pipeline and replays the slot from its confirmed position
    (`--confirm-delay` behind). The message goes in once the confirm delay
    (default 2 min) has passed under load, so the replay is a full one."""
    a = ctx.args
    rate_ = a.rates[0]
    after = a.foreign_after
    secs = after + 20
    delay = a.foreign_confirm_delay or "2m (default)"
    state = a.latency_state != "off"
    r = latency_part(f"scenario foreign: {rate_}/s, confirm delay {delay}, state {'kept' if state else 'off'}, "
                     f"one foreign message after {after}s ({secs}s)",
                     latency_walcast, ctx, rate_, secs, state, after)
    f = r.get("foreign") or {}
    log(f"    after the foreign message: {f.get('after_it')}; counted {f.get('counted')}")
    return r


def catchup_dataset(ctx, n, m):
    """Postgres + nats-server holding the catch-up stream, drained by walcast.
    With --catchup-data DIR the dataset is kept in DIR and reused by the next
    run of the same sizes (the 10M-row load takes ~25 min): only the
    after-restart figure is measured then, unless --catchup-redrain: a copy
    of the slot kept unread since before the load drains the same backlog
    again into a fresh stream (the publishing process's figures for another
    binary, without another load). Returns (pg, nats, dataset, wc, slot)
    where wc is the walcast that drained it (None when reused)."""
    a = ctx.args
    keep = Path(a.catchup_data) if a.catchup_data else None
    meta_path = keep / "dataset.json" if keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        if IS_ROOT:
            shutil.chown(keep, "postgres", "postgres")
        pg = Postgres(keep, a.pg_bin, fsync=not a.pg_fsync_off)
        pg.start()
        if meta_path.exists():
            ds = json.loads(meta_path.read_text())
            if (ds["sizes"] != [n, m]):
                raise RuntimeError(f"{keep} holds a dataset of sizes {ds['sizes']}, not {[n, m]}: "
                                   f"remove it or pass its sizes")
            log(f"  reusing the dataset in {keep}: {ds['stream_events']} events, tenant {ds['tenant_events']}")
            if not a.catchup_redrain:
                return pg, NatsServer(keep, ctx.nats_bin, "catchup", keep_store=True), ds, None, "wc_cu"
            slot = f"wc_cu_r{int(time.time())}"
            pg.sql(f"SELECT pg_copy_logical_replication_slot('{SPARE_SLOT}', '{slot}')")
            nats = NatsServer(ctx.work, ctx.nats_bin, "catchup")
            wc, drain = drain_catchup(ctx, pg, nats, slot, ds["stream_events"])
            return pg, nats, dict(ds, **drain), wc, slot
        init_db(a, pg)
    else:
        pg = ctx.pg
    pg.create_slot("wc_cu")
    if keep:
        pg.create_slot(SPARE_SLOT)
    start = pg.lsn()
    changes, txns, secs = run_load(pg, n, "c", 1000, 0.44, hot_frac=m / n)
    end = backlog_end(pg)
    wal = wal_bytes(pg, start, end)
    log(f"  load: {changes} row changes in {secs:.0f}s")
    nats = NatsServer(keep or ctx.work, ctx.nats_bin, "catchup", keep_store=bool(keep))
    wc, drain = drain_catchup(ctx, pg, nats, "wc_cu", changes)
    first = ctx.nats_req(nats, "walcast-api.v1.catchup", {"tenant_id": "chot", "after_seq": 0})
    ds = {"sizes": [n, m], "stream_events": changes, "tenant": "chot", "tenant_events": first["last_seq"],
          "wal_bytes": wal, "load_seconds": round(secs), **drain}
    if keep:
        meta_path.write_text(json.dumps(ds))
    return pg, nats, ds, wc, "wc_cu"


def catchup_env(ctx):
    """--catchup-no-state: the catch-up walcasts run without the state bucket
    (at 10M events the nats-server applies the bucket's writes for tens of
    minutes after the stream is drained)."""
    return {"WALCAST_STATE_BUCKET": ""} if ctx.args.catchup_no_state else None


# A slot created with a kept dataset and never read: copies of it drain the
# same backlog again (--catchup-redrain).
SPARE_SLOT = "wc_cu_spare"


def drain_catchup(ctx, pg, nats, slot, changes):
    """walcast drains the catch-up backlog from `slot` into `nats`."""
    wc = Walcast(ctx.walcast_bin, ctx.work, pg, nats, slot, confirm_delay="0", name="cu",
                 extra_env=catchup_env(ctx))
    t0 = time.monotonic()
    while True:
        info = stream_info(nats.nc, "WALCAST")
        if info and info["state"]["last_seq"] >= changes:
            break
        if wc.proc.poll() is not None or time.monotonic() - t0 > ctx.args.drain_timeout:
            raise RuntimeError(f"walcast did not drain the catch-up backlog; see {wc.logpath}")
        time.sleep(0.1)
    drain_s = time.monotonic() - t0
    log(f"  drained {changes} events in {drain_s:.0f}s")
    # The state bucket (SPEC §8) trails the stream: answers measured while it
    # catches up measure a busy machine, not the warm index. At 10M events
    # the nats-server takes tens of minutes to apply the bucket's writes, so
    # the wait is bounded and what was applied is recorded.
    applied = 0
    while not ctx.args.catchup_no_state and time.monotonic() - t0 < drain_s + 60:
        applied = int(wc.metrics().get("walcast_state_applied_stream_seq", 0))
        if applied >= changes or wc.proc.poll() is not None:
            break
        time.sleep(0.2)
    log(f"  state bucket applied {applied} of {changes} when the measurements start")
    return wc, {"drain_seconds": round(drain_s, 1), "drain_events_per_s": round(changes / drain_s),
                "state_applied_at_measurements": applied}


def publishing_memory(wc):
    """SPEC §6 "flat in stream length": the process that published the whole
    stream, its catch-up index at (or near) its bound."""
    m = wc.metrics()
    res = {"peak_rss_mb": round(proc_status_mb(wc.pid, "VmHWM") or 0, 1),
           "rss_mb": round(proc_status_mb(wc.pid, "VmRSS") or 0, 1),
           "index_mb": round(m.get("walcast_catchup_index_bytes", 0.0) / 1e6, 1)}
    log(f"    publishing walcast: peak RSS {res['peak_rss_mb']} MB, now {res['rss_mb']} MB, "
        f"catch-up index {res['index_mb']} MB")
    return res


def scenario_catchup(ctx):
    a = ctx.args
    n, m = a.catchup_stream, a.catchup_tenant
    log(f"scenario 6 (issue 9): catch-up, tenant with ~{m} events in a stream of ~{n}")
    pg, nats, ds, wc, slot = catchup_dataset(ctx, n, m)
    subject = "walcast-api.v1.catchup"
    hot, hot_last = ds["tenant"], ds["tenant_events"]
    rng = random.Random(7)

    def measure(label, requests=a.catchup_requests):
        times = []
        errors = 0
        checked = 0
        for i in range(requests):
            after = rng.randrange(0, hot_last)
            t = time.perf_counter()
            msg = nats.nc.request(subject, json.dumps({"tenant_id": hot, "after_seq": after}).encode(), timeout=10)
            times.append((time.perf_counter() - t) * 1e6)
            body = json.loads(msg.payload)
            if "start_stream_seq" not in body:
                errors += 1
            elif i % 50 == 0:  # spot check: the answer points at seq after+1
                got = nats.nc.request_json("$JS.API.STREAM.MSG.GET.WALCAST", {"seq": body["start_stream_seq"]})
                hdrs = base64.b64decode(got["message"].get("hdrs", "")).decode()
                want = f"Walcast-Seq: {after + 1}"
                if want not in hdrs:
                    errors += 1
                checked += 1
        res = lat.summarize_raw(times)
        res.update(errors=errors, spot_checked=checked)
        log(f"    {label}: p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms, errors {errors}")
        return res

    r = dict(ds, requests=a.catchup_requests, reused_dataset=wc is None)
    del r["sizes"]
    if wc is not None:
        r["warm_index"] = measure("same process that published (warm index)")
        r["publishing_memory"] = publishing_memory(wc)
        wc.stop()
    # SPEC §6 "Restart": from process start to the catch-up index loaded
    # (saved segments, issue 21) or, without segments, rebuilt from the stream.
    logpath = ctx.work / "walcast-cu2.log"
    log_from = logpath.stat().st_size if logpath.exists() else 0
    load_before = loadavg()
    started = time.monotonic()
    wc = Walcast(ctx.walcast_bin, ctx.work, pg, nats, slot, confirm_delay="0", name="cu2",
                 extra_env=catchup_env(ctx))
    sampler = Sampler(interval=0.1)
    sampler.watch("walcast", wc.pid)
    seen = {}

    def run_log():
        with open(logpath, errors="replace") as f:
            f.seek(log_from)
            return f.read()

    def watch_log():
        while "rebuilt" not in seen and wc.proc.poll() is None and time.monotonic() - started < 1800:
            text = run_log()
            for key, needle in (("loaded", "catch-up index loaded from saved segments"),
                                ("rebuilt", "catch-up index rebuilt")):
                if key not in seen and needle in text:
                    seen[key] = round(time.monotonic() - started, 2)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_log, daemon=True)
    watcher.start()
    wc.wait_ready()
    r["ready_seconds_from_start"] = round(time.monotonic() - started, 2)
    # Until the index is loaded (or read back from the stream), answers search the stream.
    r["during_rebuild"] = measure("after a restart, while the index is loaded", max(50, a.catchup_requests // 5))
    # Of those, answered from the saved segments while they loaded (the rest: from the stream or the index).
    r["during_rebuild"]["answers_from_saved"] = int(wc.metrics().get("walcast_catchup_answers_from_saved_total", 0))
    watcher.join(timeout=1800)
    if "rebuilt" not in seen:
        raise RuntimeError(f"walcast did not rebuild its catch-up index; see {wc.logpath}")
    r["index_loaded_seconds_from_start"] = seen.get("loaded")
    r["rebuild_seconds_from_start"] = seen["rebuilt"]
    loaded_line = next((re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in run_log().splitlines()
                        if "catch-up index loaded" in ln), "")
    r["index_loaded"] = {k: v for k, v in (w.split("=", 1) for w in loaded_line.split() if "=" in w)}
    r["load_avg_before_restart"] = load_before
    log(f"    index loaded {seen.get('loaded')} s after process start (ready {r['ready_seconds_from_start']} s, "
        f"fully rebuilt {seen['rebuilt']} s), load avg {load_before}: {loaded_line or log_tail(wc.logpath)}")
    r["after_restart"] = measure("after a restart, index loaded")
    sampler.stop()
    r["restart_peak_rss_mb"] = round(sampler.rss_peak.get("walcast", 0.0), 1)
    r["restart_rss_mb_series"] = sampler.rss_series.get("walcast", [])[-20:]
    log(f"    peak RSS after the restart {r['restart_peak_rss_mb']} MB")
    wc.stop()
    nats.stop()
    if slot != "wc_cu":
        pg.drop_slot(slot)  # a re-drain's copy
    if a.catchup_data:
        pg.stop()
    else:
        pg.drop_slot("wc_cu")
    return r


def scenario_catchup_flood(ctx):
    """Issue 16 item 6: the pipeline's commit → subscriber latency at one
    rate, without and then with a flood of catch-up requests, against the
    same walcast process. The flood runs in its own process (bench/flood.py)
    so the subscriber's receive clock does not wait for the flood's GIL."""
    a = ctx.args
    rate_ = a.flood_rate
    pg = ctx.pg
    slot = "wc_flood"
    log(f"scenario 7 (issue 16): {rate_}/s commit → subscriber latency, quiet vs a catch-up flood of "
        f"{a.flood_clients} clients × {a.flood_requests} requests per burst ({a.latency_seconds}s each)")
    pg.create_slot(slot)
    nats = NatsServer(ctx.work, ctx.nats_bin, "flood")
    wc = Walcast(ctx.walcast_bin, ctx.work, pg, nats, slot)
    wc.wait_ready()
    samples = []
    sub = Nats("127.0.0.1", nats.port)
    sub.subscribe("walcast.>", lambda msg: samples.append(msg))
    sub.flush()
    time.sleep(0.5)
    out = {"rate": rate_, "seconds": a.latency_seconds}
    interval = 1e6 / rate_
    for phase in ("quiet", "flood"):
        samples.clear()
        flood = None
        s = Sampler(interval=0.25)
        s.watch("walcast", wc.pid, from_zero=False)
        s.watch("nats-server", nats.proc.pid, from_zero=False)
        if phase == "flood":
            flood = subprocess.Popen([sys.executable, str(HERE / "flood.py"), "--port", str(nats.port),
                                      "--clients", str(a.flood_clients), "--requests", str(a.flood_requests),
                                      "--max-after", str(max(1, a.latency_seconds * rate_ // 1000)),
                                      "--seconds", str(a.latency_seconds + 2)],
                                     stdout=subprocess.PIPE, text=True)
            STARTED.append(("proc", flood))
            s.watch("flood", flood.pid, from_zero=False)
            time.sleep(1.0)
        load_before = loadavg()
        pb = run_pgbench(ctx, rate_, a.latency_seconds)
        pb.pop("_schedule", None)
        wait_count(samples, pb.get("transactions", 0))
        raw = []
        for msg in list(samples):
            ct, _ = wire.event_fields(msg.payload)
            if ct is not None:
                raw.append(msg.recv_time * 1e6 - ct)
        r = {"pgbench": pb, "received": len(raw), "missing": pb.get("transactions", 0) - len(raw),
             "raw": lat.summarize_raw(raw), "corrected": lat.summarize_corrected(raw, interval),
             "load_avg_before": load_before}
        if flood is not None:
            stdout, _ = flood.communicate(timeout=120)
            r["flood"] = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {"error": "no output"}
        s.stop()
        r["cpu_s"] = {k: s.cpu(k) for k in ("walcast", "nats-server", "flood")}
        r["machine"] = s.machine()
        f = r.get("flood", {})
        log(f"    {phase}: commit→receive p50 {r['raw']['p50_ms']} p99 {r['raw']['p99_ms']} max "
            f"{r['raw']['max_ms']} ms (CO-corrected p99 {r['corrected'].get('p99_ms')}), "
            f"{len(raw)}/{pb.get('transactions')} received, load {load_before}"
            + (f"; flood answered {f.get('answered')} ({f.get('answered_per_s')}/s, codes {f.get('codes')}, "
               f"reply p99 {g(f, 'reply_ms', 'p99_ms')} ms, bursts timed out {f.get('bursts_timed_out')})"
               if flood is not None else ""))
        out[phase] = r
    sub.close()
    wc.stop()
    nats.stop()
    pg.drop_slot(slot)
    return out


# --- reporting --------------------------------------------------------------------

def met(value, target, higher_is_better=True):
    if value is None:
        return None
    return value >= target if higher_is_better else value <= target


def g(d, *keys):
    """d[k1][k2]..., or None when any level is missing (a failed run)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def err(run):
    e = g(run, "error")
    return f"FAILED: {e[:160]}" if e else ""


def summary_rows(res):
    rows = []
    sc = res["scenarios"]
    b = sc.get("backfill")
    if b and "error" not in b:
        rows.append(("8 backfill (SPEC §8)", "rows/s; walcast peak RSS MB", b["rows_per_s"], "flat RSS",
                     "see RSS", f"{b['rows']} rows in {b['seconds']} s, peak RSS {b['peak_rss_mb']} MB"))
    al = sc.get("auth_logins")
    if al and "error" not in al:
        b = al["best"]
        rows.append((f"10 auth callout, {b['concurrency']} logins at once (SPEC §9)", "p99 ms", b["p99_ms"], "—", None,
                     f"{b['logins_per_s']} logins/s, p50 {b['p50_ms']} ms, failed {sum(b['refused_or_failed'].values())}, "
                     f"CPU s walcast {b['cpu_s']['walcast']} nats-server {b['cpu_s']['nats-server']}"))
    sl = sc.get("state_load")
    if sl and "error" not in sl:
        for n, bound in ((10_000, 100), (100_000, 1000)):
            for suffix, who in (("", "Rust"), ("_typescript", "TypeScript")):
                r = sl.get(f"rows_{n}{suffix}")
                if r and "error" not in r:
                    rows.append((f"9 load a {n}-row tenant (SPEC §8)", f"p99 ms ({who} client)", r["p99_ms"],
                                 f"<= {bound}", met(r["p99_ms"], bound, higher_is_better=False),
                                 f"p50 {r['p50_ms']} ms over {r['loads']} loads; "
                                 + ts_floor_note(r) +
                                 f"load avg before {r['load_avg_before']}"))
    d = sc.get("drain")
    if d and "error" not in d:
        base = d.get("baseline_events_per_s")
        rows.append(("1 backlog drain, state bucket kept", "walcast / pg_recvlogical events/s", d["ratio"],
                     ">= 1.0", met(d["ratio"], 1.0),
                     err(d["walcast"]) or f"{rate(d['walcast'])} vs {base} events/s; CPU-cost ratio "
                                          f"{d.get('cpu_cost_ratio')}"))
        if "ratio_no_state" in d:
            rows.append(("1a backlog drain, state off", "walcast / pg_recvlogical events/s", d["ratio_no_state"],
                         ">= 1.2", met(d["ratio_no_state"], 1.2),
                         err(d["walcast_no_state"]) or f"{rate(d['walcast_no_state'])} events/s"))
        rows.append(("1b drain, --dry-run", "walcast / pg_recvlogical events/s", d["ratio_dry_run"], ">= 1.5",
                     met(d["ratio_dry_run"], 1.5),
                     err(d["walcast_dry_run"]) or f"{rate(d['walcast_dry_run'])} events/s; CPU-cost ratio "
                                                  f"{d.get('cpu_cost_ratio_dry_run')}"))
        rows.append(("1c drain, --confirm-delay 0 vs default 2m (issue 11)", "default / 0 events/s",
                     d["confirm_delay_slowdown"], ">= 0.95", met(d["confirm_delay_slowdown"], 0.95),
                     err(d["walcast_confirm_delay_0"]) or
                     f"{rate(d['walcast_confirm_delay_0'])} events/s with 0 "
                     f"(ratio to pg_recvlogical {d['ratio_confirm_delay_0']})"))
        v = g(d, "walcast", "peak_rss_mb")
        rows.append(("3 memory, drain", "walcast peak RSS MB", v, "<= 50", met(v, 50, False), err(d["walcast"])))
    b = sc.get("big_tx")
    if b and "error" not in b:
        v = g(b, "walcast", "peak_rss_mb")
        rows.append((f"3 memory, one {b['rows']:,}-row transaction", "walcast peak RSS MB", v, "<= 50",
                     met(v, 50, False), err(b["walcast"]) or f"{rate(b['walcast'])} events/s"))
    t = sc.get("tenants")
    if t and "error" not in t:
        v = t.get("normalized_ratio_vs_1k_tenants")
        rows.append((f"4 {t['backlog']['tenants']:,} tenants", "rate / 1,000-tenant rate (each vs its baseline)",
                     v, ">= 0.95", met(v, 0.95),
                     err(t["walcast"]) or f"raw ratio {t.get('ratio_vs_1k_tenants')}; {rate(t['walcast'])} events/s, "
                                          f"{t.get('ratio_vs_pg_recvlogical')} of pg_recvlogical"))
    i = sc.get("idle")
    if i and "error" not in i:
        v = i["cpu_percent_of_one_core"]["walcast"]
        rows.append(("5 idle", "walcast CPU % of one core", v, "~0 (<= 0.5)", met(v, 0.5, False),
                     f"{i['cpu_s']['walcast']} CPU s in {i['seconds']} s"))
    lt = sc.get("latency")
    if lt and "error" not in lt:
        for rate_s, r in lt.items():
            if not isinstance(r, dict):
                continue
            f = g(r, "floor_pg_recvlogical", "corrected") or {}
            # SPEC §6: at 1,000/s p50 <= 1 and p99 <= 5 ms; at 5,000/s p99 <= 10 raw and <= 15 corrected.
            targets = {"1000": [("p50", 1, 1), ("p99", 5, 5)], "5000": [("p99", 10, 15)]}.get(
                rate_s, [("p99", None, None)])
            for who, suffix in (("walcast", ""), ("walcast_no_state", ", state bucket off")):
                if who not in r:
                    continue
                c = g(r, who, "corrected") or {}
                note = err(r.get(who))
                label = f"2 latency {int(rate_s):,}/s{suffix}"
                for p, raw_tgt, tgt in targets:
                    v = c.get(f"{p}_ms")
                    raw_v = g(r, who, "raw", p + "_ms")
                    sched_v = g(r, who, "from_schedule", p + "_ms")
                    raw_note = "" if raw_tgt is None else \
                        f" ({'met' if met(raw_v, raw_tgt, False) else 'missed'} <= {raw_tgt})"
                    rows.append((label, f"{p} ms (CO-corrected)", v, "-" if tgt is None else f"<= {tgt}",
                                 None if tgt is None else met(v, tgt, False),
                                 note or f"raw {raw_v}{raw_note}; from schedule {sched_v}; pg_recvlogical floor: "
                                         f"corrected {f.get(p + '_ms')}, raw {g(r, 'floor_pg_recvlogical', 'raw', p + '_ms')}"))
    cu = sc.get("catchup")
    if cu and "error" not in cu and cu.get("rebuild_seconds_from_start") is not None:
        v = cu.get("index_loaded_seconds_from_start")
        rows.append((f"6 restart ({cu['stream_events']:,} events): process start → catch-up index loaded",
                     "s", v, "<= 5", met(v, 5, False) if v is not None else False,
                     f"fully rebuilt at {cu['rebuild_seconds_from_start']} s; loaded {g(cu, 'index_loaded', 'positions')} "
                     f"positions, read back {g(cu, 'index_loaded', 'read_back')}; peak RSS {cu.get('restart_peak_rss_mb')} MB"))
    if cu and "error" not in cu:
        for phase in ("warm_index", "during_rebuild", "after_restart"):
            if phase not in cu:
                continue
            v = g(cu, phase, "p99_ms")
            ok = met(v, 20, False)
            rows.append((f"6 catch-up ({cu['tenant_events']:,} of {cu['stream_events']:,} events), {phase}",
                         "p99 ms", v, "<= 20", ok and not g(cu, phase, "errors"),
                         err(cu.get(phase)) or f"p50 {g(cu, phase, 'p50_ms')} ms, errors {g(cu, phase, 'errors')}"))
    pm = (cu or {}).get("publishing_memory")
    if pm:
        v = pm.get("peak_rss_mb")
        rows.append((f"6 memory, process that published {cu['stream_events']:,} events", "peak RSS MB", v, "<= 50",
                     met(v, 50, False), f"RSS now {pm.get('rss_mb')} MB, catch-up index {pm.get('index_mb')} MB"))
    fl = sc.get("catchup_flood")
    if fl and "error" not in fl:
        for phase in ("quiet", "flood"):
            r = fl.get(phase) or {}
            v = g(r, "raw", "p99_ms")
            note = f"p50 {g(r, 'raw', 'p50_ms')} ms, max {g(r, 'raw', 'max_ms')} ms, CO-corrected p99 " \
                   f"{g(r, 'corrected', 'p99_ms')}; load {r.get('load_avg_before')}"
            if phase == "flood":
                note += f"; catch-up answered {g(r, 'flood', 'answered')} ({g(r, 'flood', 'answered_per_s')}/s)"
            rows.append((f"7 latency {fl['rate']:,}/s, {phase} (issue 16)", "p99 ms (raw)", v, "<= 5",
                         met(v, 5, False), note))
    import fanout
    rows += fanout.summary_rows(sc)
    for name, r in sc.items():
        if isinstance(r, dict) and "error" in r:
            rows.append((name, "scenario", None, "", False, err(r)))
    # A run that failed has no value, and it did not meet its target.
    return [(n, m, v, t, False if str(note).startswith("FAILED") else ok, note) for n, m, v, t, ok, note in rows]


def markdown(res):
    m = res["meta"]
    out = [f"# walcast benchmark results ({m.get('finished')})", "",
           f"- command: `{m['command']}`",
           f"- walcast {m['git_commit']}{' (dirty tree)' if m['git_dirty'] else ''}, {m['walcast_version']}, "
           f"binary `{m['walcast_bin']}`" + (f" — {m['label']}" if m.get("label") else ""),
           f"- machine: {m['cpus']} CPUs ({m.get('cpu', 'CPU not recorded')}), {m['mem_gb']} GB; load before: `{m['uptime_before']}`; "
           f"after: `{m.get('uptime_after')}`; Postgres over {m.get('pg_transport', 'loopback TCP')}",
           f"- sizes: {json.dumps(m['sizes'])}", "",
           "| scenario | metric | value | target | met | notes |", "|---|---|---|---|---|---|"]
    for name, metric, value, target, ok, note in summary_rows(res):
        mark = "—" if ok is None else ("yes" if ok else "**no**")
        out.append(f"| {name} | {metric} | {value} | {target} | {mark} | {note} |")
    for key, title in (("drain", "1,000 tenants"), ("tenants", "large tenant count")):
        d = res["scenarios"].get(key)
        if not d or "error" in d:
            continue
        out += ["", f"Backlog drain detail, {title} ({d['backlog']['events']:,} events, "
                    f"{d['backlog']['wal_bytes'] / 1e6:.0f} MB WAL); CPU seconds per 1M events:", "",
                "| run | events/s | WAL MB/s | walcast | nats-server | walsender | pg_recvlogical | machine busy (foreign) |",
                "|---|---|---|---|---|---|---|---|"]
        for kind, rs in d.get("runs", {}).items():
            for i, r in enumerate(rs):
                label = f"{'pg_recvlogical' if kind == 'baseline' else 'walcast ' + kind} #{i + 1}"
                if "error" in r:
                    out.append(f"| {label} | {err(r)} | | | | | | |")
                    continue
                c = r["cpu_s_per_1m_events"]
                mach = r["machine"]
                ins = r.get("instructions_per_event")
                wc_cpu = f"{c.get('walcast', '')}" + (f" ({ins:,} instructions/event)" if ins else "")
                out.append(f"| {label} | {r['events_per_s']} | {r['wal_mb_per_s']} | {wc_cpu} | "
                           f"{c.get('nats-server', '')} | {c.get('walsender', '')} | {c.get('pg_recvlogical', '')} | "
                           f"{round(mach['utilization'] * 100)} % ({round(mach.get('foreign_share', 0) * 100)} %) |")
    lt = res["scenarios"].get("latency")
    if lt and "error" not in lt:
        out += ["", "Latency detail, ms: commit → receive raw / CO-corrected, and from pgbench's scheduled start:", "",
                "| rate | who | p50 | p90 | p99 | max | from schedule p50 / p99 / max | achieved tps | "
                "pgbench schedule lag avg/max ms | walsender behind p50 / p99 / max ms |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for rate_s, r in lt.items():
            if not isinstance(r, dict):
                continue
            for who in ("floor_pg_recvlogical", "walcast", "walcast_no_state"):
                if who not in r:
                    continue
                w = r[who]
                if "error" in w:
                    out.append(f"| {rate_s} | {who} | {err(w)} | | | | | | | |")
                    continue
                raw, cor, pb, fs = w["raw"], w["corrected"], w["pgbench"], w.get("from_schedule", {})
                ws = w.get("walsender_behind") or {}
                out.append(f"| {rate_s} | {who} | {raw.get('p50_ms')} / {cor.get('p50_ms')} | "
                           f"{raw.get('p90_ms')} / {cor.get('p90_ms')} | {raw.get('p99_ms')} / {cor.get('p99_ms')} | "
                           f"{raw.get('max_ms')} | {fs.get('p50_ms')} / {fs.get('p99_ms')} / {fs.get('max_ms')} | "
                           f"{pb.get('tps')} | {pb.get('schedule_lag_avg_ms')}/{pb.get('schedule_lag_max_ms')} | "
                           f"{ws.get('p50_ms')} / {ws.get('p99_ms')} / {ws.get('max_ms')} |")
    import fanout
    out += fanout.markdown(res)
    prof = g(res["scenarios"], "drain", "profile")
    if prof and "top" in prof:
        out += ["", f"walcast CPU profile during the drain (perf, self time; full report `{prof['file']}`):", "",
                "```"] + prof["top"][:20] + ["```"]
    return "\n".join(out) + "\n"


# --- main -----------------------------------------------------------------------------

class Ctx:
    pass


def init_db(a, pg):
    """Schema, publication and the load procedure; no slot (scenarios create their own)."""
    env = dict(os.environ, WALCAST_DATABASE_URL=pg.url)
    subprocess.run([a.walcast_bin, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    pg.drop_slot("walcast")
    pg.sql_file(HERE / "load.sql")


def main():
    import fanout
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--walcast-bin", default=str(ROOT / "target/release/walcast"))
    ap.add_argument("--pg-bin", default=os.environ.get("WALCAST_PG_BIN", "/usr/lib/postgresql/15/bin"))
    ap.add_argument("--nats-server", default=os.environ.get("WALCAST_NATS_SERVER",
                                                             str(ROOT / ".tools/bin/nats-server")))
    ap.add_argument("--scenarios", default="drain,tenants,latency,big_tx,idle",
                    help="comma-separated: drain,tenants,latency,big_tx,backfill,state_load,auth_logins,idle,catchup,catchup_flood,"
                         "ws_fanout,gateway_fanout,steady,foreign "
                         "(default: all but the catch-up ones and steady)")
    ap.add_argument("--catchup", action="store_true", help="also run the catch-up scenario (issue 9)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke-test sizes: 100k-row drains, 10k tenants, 500k-row tx, 10 s latency/idle")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every row count by this")
    ap.add_argument("--rows", type=int, default=1_000_000, help="row changes per drain backlog")
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--tenants-large", type=int, default=100_000)
    ap.add_argument("--big-tx-rows", type=int, default=5_000_000)
    ap.add_argument("--backfill-rows", type=int, default=1_000_000)
    ap.add_argument("--logins", type=int, default=1000, help="auth_logins: concurrent logins per round")
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--foreign-after", type=int, default=140,
                    help="foreign: seconds of load before the foreign message (past the 2 min confirm delay)")
    ap.add_argument("--foreign-confirm-delay", help="foreign: walcast's --confirm-delay (default: its default, 2m)")
    ap.add_argument("--latency-seconds", type=int, default=60)
    ap.add_argument("--latency-receiver", choices=("rust", "python"), default="rust",
                    help="latency: who receives walcast's events — the Rust probe in its own process "
                         "(clients/rust/examples/latency_probe) or the harness's Python subscriber")
    ap.add_argument("--latency-state", choices=("on", "off", "both"), default="both",
                    help="latency: walcast with the state bucket kept (on), without it (off), or both runs")
    ap.add_argument("--floor-seconds", type=int, default=20)
    ap.add_argument("--idle-seconds", type=int, default=60)
    ap.add_argument("--steady-rate", type=int, default=3000, help="steady: single-row commits/s over --tenants-large tenants")
    ap.add_argument("--steady-seconds", type=int, default=600, help="steady: how long (past the confirm delay's buckets and the catch-up index's exact-position budget at 100,000 tenants)")
    ap.add_argument("--catchup-stream", type=int, default=1_000_000,
                    help="events in the catch-up stream (the issue's size: 10,000,000)")
    ap.add_argument("--catchup-tenant", type=int, default=100_000,
                    help="events of the caught-up tenant (the issue's size: 1,000,000)")
    ap.add_argument("--catchup-requests", type=int, default=1000)
    ap.add_argument("--flood-rate", type=int, default=1000, help="commits/s of the catchup_flood scenario")
    ap.add_argument("--flood-clients", type=int, default=10, help="catch-up flood: concurrent clients")
    ap.add_argument("--flood-requests", type=int, default=2000,
                    help="catch-up flood: requests each client sends at once, burst after burst")
    ap.add_argument("--catchup-data", metavar="DIR",
                    help="keep the catch-up dataset (Postgres + JetStream store) in DIR and reuse it next time")
    ap.add_argument("--catchup-no-state", action="store_true",
                    help="catch-up scenario: walcast without the state bucket (SPEC §8)")
    ap.add_argument("--catchup-redrain", action="store_true",
                    help="with a kept --catchup-data: drain its backlog again (a copy of its spare slot) "
                         "into a fresh stream, measuring the publishing process too")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds of each drain run (interleaved); the best round counts (noisy machines: 3)")
    ap.add_argument("--drain-timeout", type=int, default=3600)
    ap.add_argument("--stall-timeout", type=int, default=60,
                    help="fail a drain whose event count has not moved for this long")
    ap.add_argument("--profile", action="store_true", help="perf record one extra (untimed) drain of walcast")
    ap.add_argument("--profile-system", action="store_true",
                    help="with --profile: record the whole machine (walcast, nats-server, walsender), by process")
    ap.add_argument("--profile-no-state", action="store_true",
                    help="with --profile: the profiled drain runs without the state bucket")
    ap.add_argument("--callgrind", action="store_true",
                    help="drain: run walcast under valgrind's callgrind and record its instructions per event "
                         "(deterministic, for A/B on a shared machine; ~50x slower, so use --rows 20000)")
    ap.add_argument("--compare-bin", help="drain: also run this walcast binary (kinds compare, compare_no_state) "
                                          "on the same backlog, interleaved: an A/B of two builds")
    ap.add_argument("--compare-nats", metavar="NATS_SERVER",
                    help="drain: also run walcast against this nats-server binary (kinds compare_nats, "
                         "compare_nats_no_state), interleaved with the rest")
    ap.add_argument("--pg-fsync-off", action="store_true", help="run Postgres with fsync=off (default: on)")
    ap.add_argument("--pg-unix-socket", action="store_true",
                    help="every client (pg_recvlogical and walcast included) connects to Postgres through its Unix socket")
    ap.add_argument("--pg-veth", action="store_true",
                    help="Postgres runs in a network namespace of its own and every client reaches it over a veth "
                         "pair, as from another container (needs root and `ip`)")
    ap.add_argument("--label", default="", help="free text recorded with the results (e.g. what the binary is)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    fanout.add_arguments(ap)
    a = ap.parse_args()
    Postgres.unix_socket = a.pg_unix_socket
    if a.quick:
        a.rows, a.tenants_large, a.big_tx_rows = 100_000, 10_000, 500_000
        a.latency_seconds, a.floor_seconds, a.idle_seconds = 10, 5, 10
        a.catchup_stream, a.catchup_tenant, a.catchup_requests = 100_000, 10_000, 300
    for k in ("rows", "big_tx_rows", "catchup_stream", "catchup_tenant"):
        setattr(a, k, max(1000, int(getattr(a, k) * a.scale)))
    a.rates = [int(x) for x in a.rates.split(",") if x]
    scenarios = [s for s in a.scenarios.split(",") if s]
    if a.catchup and "catchup" not in scenarios:
        scenarios.append("catchup")

    results_dir = Path(a.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    if not Path(a.walcast_bin).exists():
        sys.exit(f"no walcast binary at {a.walcast_bin}: cargo build --release -p walcast")

    work = Path(tempfile.mkdtemp(prefix="walcast-bench."))
    os.chmod(work, 0o755)
    ctx = Ctx()
    ctx.args, ctx.work, ctx.results_dir = a, work, results_dir
    ctx.walcast_bin, ctx.nats_bin = a.walcast_bin, a.nats_server
    ctx.nats_req = lambda nats, subj, obj: nats.nc.request_json(subj, obj, timeout=10)

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    meta = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench.sh"] + sys.argv[1:]),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")),
        "walcast_version": subprocess.run([a.walcast_bin, "--version"], capture_output=True,
                                          text=True).stdout.strip(),
        "walcast_bin": a.walcast_bin,
        "label": a.label,
        "cpus": os.cpu_count(),
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cpu": cpu_model(),
        "pg_transport": "unix socket" if a.pg_unix_socket else "veth" if a.pg_veth else "loopback TCP",
        "uptime_before": uptime_text(),
        "postgres": subprocess.run([str(Path(a.pg_bin) / "postgres"), "--version"], capture_output=True,
                                   text=True).stdout.strip(),
        "nats_server": subprocess.run([a.nats_server, "--version"], capture_output=True, text=True).stdout.strip(),
        "scenarios": scenarios,
        "sizes": {"rows": a.rows, "tenants": a.tenants, "tenants_large": a.tenants_large,
                  "big_tx_rows": a.big_tx_rows, "rates": a.rates, "latency_seconds": a.latency_seconds,
                  "idle_seconds": a.idle_seconds,
                  **({"catchup_stream": a.catchup_stream, "catchup_tenant": a.catchup_tenant}
                     if "catchup" in scenarios else {})},
        "work_dir": str(work),
    }
    res = {"meta": meta, "scenarios": {}, "load_samples": []}
    stop_load = threading.Event()

    def sample_load():
        while not stop_load.wait(10):
            res["load_samples"].append([round(time.monotonic() - T0), *loadavg()])

    threading.Thread(target=sample_load, daemon=True).start()
    log(f"work dir {work}; {meta['uptime_before']}")
    try:
        if a.pg_veth:
            Postgres.veth_namespace = make_veth_namespace()
        pg = Postgres(work, a.pg_bin, fsync=not a.pg_fsync_off)
        pg.start()
        ctx.pg = pg
        meta["postgres_settings"] = pg.settings
        init_db(a, pg)

        order = ["drain", "tenants", "big_tx", "backfill", "state_load", "auth_logins", "idle", "latency", "foreign",
                 "steady",
                 "catchup", "catchup_flood", "ws_fanout", "gateway_fanout"]
        for name in order:
            if name not in scenarios:
                continue
            t = time.monotonic()
            try:
                if name == "drain":
                    r = scenario_drain(ctx)
                elif name == "tenants":
                    r = scenario_tenants(ctx, res["scenarios"].get("drain"))
                elif name == "big_tx":
                    r = scenario_big_tx(ctx)
                elif name == "backfill":
                    r = scenario_backfill(ctx)
                elif name == "state_load":
                    r = scenario_state_load(ctx)
                elif name == "auth_logins":
                    r = scenario_auth_logins(ctx)
                elif name == "idle":
                    r = scenario_idle(ctx)
                elif name == "latency":
                    r = scenario_latency(ctx)
                elif name == "foreign":
                    r = scenario_foreign(ctx)
                elif name == "steady":
                    r = scenario_steady(ctx)
                elif name == "catchup_flood":
                    r = scenario_catchup_flood(ctx)
                elif name in ("ws_fanout", "gateway_fanout"):
                    r = getattr(fanout, f"scenario_{name}")(ctx)
                else:
                    r = scenario_catchup(ctx)
            except Exception as e:  # keep the other scenarios' results
                log(f"scenario {name} FAILED: {e}")
                r = {"error": str(e)}
            r["scenario_seconds"] = round(time.monotonic() - t, 1)
            r["load_avg_after"] = loadavg()
            res["scenarios"][name] = r
            write_results(res, results_dir, partial=True)
    finally:
        stop_load.set()
        cleanup()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    meta["uptime_after"] = uptime_text()
    meta["total_seconds"] = round(time.monotonic() - T0, 1)
    write_results(res, results_dir)
    print(markdown(res))


def write_results(res, results_dir, partial=False):
    res["meta"].setdefault("finished", "(in progress)")
    res["meta"].setdefault("uptime_after", uptime_text())
    ok = {k: v for k, v in res["scenarios"].items() if "error" not in v}
    view = dict(res, scenarios=ok)
    try:
        md = markdown(view)
    except (KeyError, TypeError) as e:
        md = f"(markdown failed: {e})\n"
    res["summary"] = [dict(zip(("scenario", "metric", "value", "target", "met", "notes"), row))
                      for row in summary_rows(view)]
    suffix = ".tmp" if partial else ""
    (results_dir / f"latest.json{suffix}").write_text(json.dumps(res, indent=2) + "\n")
    (results_dir / f"latest.md{suffix}").write_text(md)
    if partial:
        res["meta"].pop("finished", None)
        res["meta"].pop("uptime_after", None)
    else:
        for p in ("latest.json.tmp", "latest.md.tmp"):
            (results_dir / p).unlink(missing_ok=True)


VETH_NET = "10.213.0"  # --pg-veth: the host's end is .1, Postgres's .2


def make_veth_namespace():
    """A network namespace joined to this one by a veth pair (needs root)."""
    ns, ends = f"walcast-bench-{os.getpid()}", (f"wbh{os.getpid()}", f"wbn{os.getpid()}")
    steps = [["ip", "netns", "add", ns],
             ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]],
             ["ip", "link", "set", ends[1], "netns", ns],
             ["ip", "addr", "add", f"{VETH_NET}.1/24", "dev", ends[0]],
             ["ip", "link", "set", ends[0], "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{VETH_NET}.2/24", "dev", ends[1]],
             ["ip", "netns", "exec", ns, "ip", "link", "set", ends[1], "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    STARTED.append(("netns", ns))
    for step in steps:
        subprocess.run(step, check=True)
    return ns


def cleanup():
    for kind, obj in reversed(STARTED):
        try:
            if kind == "proc":
                stop_proc(obj, timeout=10)
            elif kind == "pg":
                obj.stop()
            elif kind == "netns":  # its end of the veth pair goes with it
                subprocess.run(["ip", "netns", "del", obj], check=False)
        except Exception as e:  # noqa: BLE001 — best effort
            log(f"cleanup: {e}")
    STARTED.clear()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
