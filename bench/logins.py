"""Auth callout logins (issue 20, SPEC §9): many NATS clients connecting at
once with an application token, each answered by walcast's auth callout.

Standard library only. A login is: TCP connect, read INFO, send CONNECT with
`auth_token` (an HS256 JWT with `tenant_id` and `exp`) and PING, wait for
PONG (allowed) or -ERR (refused). Its latency runs from the TCP connect to
that answer. `concurrency` logins are started at once, then the next wave;
every connection stays open until the run ends (as browsers would).
"""

import asyncio
import base64
import hashlib
import hmac
import json
import time


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(secret: bytes, claims: dict) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signing_input = f"{header}.{body}".encode()
    signature = b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{header}.{body}.{signature}"


async def login(host: str, port: int, token: str, opened: list):
    """Seconds to PONG, or raises with the server's -ERR."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    opened.append(writer)
    info = await reader.readline()
    if not info.startswith(b"INFO"):
        raise RuntimeError(f"no INFO: {info[:80]!r}")
    connect = {"verbose": False, "pedantic": False, "auth_token": token, "lang": "python",
               "version": "0", "protocol": 1, "headers": True, "no_responders": True}
    writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
    await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            raise RuntimeError("connection closed")
        if line.startswith(b"PONG"):
            return time.perf_counter() - t0
        if line.startswith(b"-ERR"):
            raise RuntimeError(line.decode().strip())
        # PING from the server or an INFO update: ignore.


async def run(host: str, port: int, secret: bytes, total: int, concurrency: int, tenants: int = 10):
    opened = []
    latencies, errors = [], {}
    exp = int(time.time()) + 3600
    t0 = time.perf_counter()
    for start in range(0, total, concurrency):
        wave = [login(host, port, hs256_token(secret, {"tenant_id": f"t{i % tenants}", "exp": exp}), opened)
                for i in range(start, min(total, start + concurrency))]
        for result in await asyncio.gather(*wave, return_exceptions=True):
            if isinstance(result, Exception):
                key = str(result)[:120]
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(result)
    seconds = time.perf_counter() - t0
    for w in opened:
        w.close()
    latencies.sort()

    def pct(p):
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1e3, 1)

    return {"logins": len(latencies), "refused_or_failed": errors, "seconds": round(seconds, 2),
            "logins_per_s": round(len(latencies) / seconds) if seconds else None,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0), "concurrency": concurrency}
