#!/usr/bin/env python3
"""A flood of catch-up requests (issue 16 item 6), run as its own process by
the `catchup_flood` scenario of bench/run.py: in the harness's process the
flood's threads would hold the GIL while the latency subscriber waits to
read, and the subscriber's clock would measure Python, not walcast.

Each client has its own NATS connection and sends bursts of `--requests`
requests at once (pipelined on its socket, random tenant `<prefix>1..N`,
random `after_seq` in 0..--max-after), waits for every reply of the burst
(or `--burst-timeout`), then sends the next burst, until `--seconds` pass.
Prints one JSON object: requests sent and answered, answers by error code,
bursts that timed out, and each request's send → reply time (queueing
included: with 10 × 2,000 requests outstanding, most of it is).

Standard library only.
"""

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import latency as lat  # noqa: E402
from natsproto import Nats  # noqa: E402


def client(a, idx, deadline, out):
    nc = Nats("127.0.0.1", a.port)
    rng = random.Random(a.seed * 1000 + idx)
    inbox = f"_FLOOD.{idx}.{rng.randrange(1 << 30)}"
    lock = threading.Lock()
    sent_at = {}
    done = threading.Event()
    state = {"answered": 0, "codes": {}, "times": [], "expected": 0}

    def on_reply(msg):
        now = time.perf_counter()
        token = msg.subject.rsplit(".", 1)[-1]
        code = msg.header("Nats-Service-Error-Code") or ("503" if msg.status() == 503 else "200")
        with lock:
            t = sent_at.pop(token, None)
            if t is None:
                return
            state["answered"] += 1
            state["codes"][code] = state["codes"].get(code, 0) + 1
            state["times"].append((now - t) * 1e6)
            if not sent_at:
                done.set()

    nc.subscribe(inbox + ".*", on_reply)
    nc.flush()
    sent = bursts = timed_out = 0
    while time.monotonic() < deadline:
        done.clear()
        parts = []
        with lock:
            now = time.perf_counter()
            for i in range(a.requests):
                token = f"{bursts}x{i}"
                body = json.dumps({"tenant_id": f"{a.tenant_prefix}{rng.randint(1, a.tenants)}",
                                   "after_seq": rng.randint(0, a.max_after)}).encode()
                parts.append(f"PUB {a.subject} {inbox}.{token} {len(body)}\r\n".encode() + body + b"\r\n")
                sent_at[token] = now
        nc._send(b"".join(parts))
        sent += a.requests
        bursts += 1
        if not done.wait(a.burst_timeout):
            timed_out += 1
            with lock:
                sent_at.clear()
    nc.close()
    with lock:
        out[idx] = dict(state, sent=sent, bursts=bursts, bursts_timed_out=timed_out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--subject", default="walcast-api.v1.catchup")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--requests", type=int, default=2000, help="requests per burst, per client")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--tenant-prefix", default="lat")
    ap.add_argument("--max-after", type=int, default=30)
    ap.add_argument("--burst-timeout", type=float, default=10)
    ap.add_argument("--seed", type=int, default=16)
    a = ap.parse_args()
    out = {}
    began = time.monotonic()
    deadline = began + a.seconds
    threads = [threading.Thread(target=client, args=(a, i, deadline, out)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.monotonic() - began
    codes, times = {}, []
    for r in out.values():
        times.extend(r.pop("times"))
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    answered = sum(r["answered"] for r in out.values())
    print(json.dumps({
        "clients": a.clients, "requests_per_burst": a.requests, "seconds": round(secs, 1),
        "sent": sum(r["sent"] for r in out.values()), "answered": answered,
        "answered_per_s": round(answered / secs), "codes": codes,
        "bursts": sum(r["bursts"] for r in out.values()),
        "bursts_timed_out": sum(r["bursts_timed_out"] for r in out.values()),
        "reply_ms": lat.summarize_raw(times),
    }))


if __name__ == "__main__":
    main()
