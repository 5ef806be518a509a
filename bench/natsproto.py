"""A minimal NATS client on the raw text protocol (standard library only).

Enough for the benchmark harness: request/reply (JetStream API, catch-up
service) and one fast subscription whose messages go to a callback together
with the wall-clock time the bytes were read from the socket.
"""

import itertools
import json
import queue
import random
import socket
import string
import threading
import time


class NatsError(Exception):
    pass


class Msg:
    __slots__ = ("subject", "reply", "headers", "payload", "recv_time")

    def __init__(self, subject, reply, headers, payload, recv_time):
        self.subject = subject
        self.reply = reply
        self.headers = headers
        self.payload = payload
        self.recv_time = recv_time

    def header(self, name):
        """First value of header `name` (case-insensitive), or None."""
        if not self.headers:
            return None
        lname = name.lower().encode()
        for line in self.headers.split(b"\r\n")[1:]:
            k, sep, v = line.partition(b":")
            if sep and k.strip().lower() == lname:
                return v.strip().decode()
        return None

    def status(self):
        """NATS status line code of a header-only message (e.g. 503 no responders)."""
        if not self.headers:
            return None
        first = self.headers.split(b"\r\n", 1)[0].split()
        if len(first) >= 2 and first[1].isdigit():
            return int(first[1])
        return None


class Nats:
    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.wlock = threading.Lock()
        self.subs = {}
        self.sid = itertools.count(1)
        self.inbox = "_INBOX." + "".join(random.choices(string.ascii_letters, k=16))
        self.replies = {}
        self.req_id = itertools.count(1)
        self.pongs = queue.Queue()
        self.closed = False
        buf = b""
        while b"\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise NatsError("connection closed before INFO")
            buf += chunk
        line, _, self._rest = buf.partition(b"\r\n")
        if not line.startswith(b"INFO "):
            raise NatsError(f"unexpected greeting {line[:80]!r}")
        self.info = json.loads(line[5:])
        connect = {"verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                   "protocol": 1, "name": "walcast-bench", "lang": "python", "version": "0"}
        self._send(b"CONNECT " + json.dumps(connect).encode() + b"\r\n")
        self.sock.settimeout(None)
        self.reader = threading.Thread(target=self._read_loop, daemon=True)
        self.reader.start()
        self.subscribe(self.inbox + ".*", self._on_reply)
        self.flush()

    # -- writing -----------------------------------------------------------
    def _send(self, data):
        with self.wlock:
            self.sock.sendall(data)

    def subscribe(self, subject, callback):
        sid = next(self.sid)
        self.subs[sid] = callback
        self._send(f"SUB {subject} {sid}\r\n".encode())
        return sid

    def unsubscribe(self, sid):
        self.subs.pop(sid, None)
        self._send(f"UNSUB {sid}\r\n".encode())

    def publish(self, subject, payload=b"", reply=None):
        if isinstance(payload, str):
            payload = payload.encode()
        head = f"PUB {subject} {reply + ' ' if reply else ''}{len(payload)}\r\n".encode()
        self._send(head + payload + b"\r\n")

    def flush(self, timeout=10.0):
        self._send(b"PING\r\n")
        try:
            self.pongs.get(timeout=timeout)
        except queue.Empty:
            raise NatsError("no PONG from server") from None

    def request(self, subject, payload=b"", timeout=5.0):
        token = str(next(self.req_id))
        slot = queue.Queue(1)
        self.replies[token] = slot
        try:
            self.publish(subject, payload, reply=f"{self.inbox}.{token}")
            try:
                msg = slot.get(timeout=timeout)
            except queue.Empty:
                raise NatsError(f"request to {subject} timed out") from None
        finally:
            self.replies.pop(token, None)
        if msg.status() == 503:
            raise NatsError(f"no responders on {subject}")
        return msg

    def request_json(self, subject, obj=None, timeout=5.0):
        body = b"" if obj is None else json.dumps(obj).encode()
        return json.loads(self.request(subject, body, timeout).payload or b"{}")

    def _on_reply(self, msg):
        token = msg.subject.rsplit(".", 1)[-1]
        slot = self.replies.get(token)
        if slot is not None:
            try:
                slot.put_nowait(msg)
            except queue.Full:
                pass

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    # -- reading -----------------------------------------------------------
    def _read_loop(self):
        buf = self._rest
        sock = self.sock
        pos = 0
        now = time.time()
        try:
            while True:
                # Parse whatever is complete in buf[pos:].
                while True:
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    line = buf[pos:eol]
                    op = line[:4]
                    if op == b"MSG " or op == b"HMSG":
                        parts = line.split()
                        if op == b"MSG ":
                            hlen = 0
                            total = int(parts[-1])
                        else:
                            hlen = int(parts[-2])
                            total = int(parts[-1])
                        end = eol + 2 + total
                        if len(buf) < end + 2:
                            break  # body not complete yet
                        subject = parts[1].decode()
                        sid = int(parts[2])
                        nfixed = 4 if op == b"MSG " else 5
                        reply = parts[3].decode() if len(parts) > nfixed else None
                        body = buf[eol + 2:end]
                        pos = end + 2
                        cb = self.subs.get(sid)
                        if cb is not None:
                            cb(Msg(subject, reply, body[:hlen] if hlen else None, body[hlen:], now))
                    else:
                        pos = eol + 2
                        if line == b"PING":
                            self._send(b"PONG\r\n")
                        elif line == b"PONG":
                            self.pongs.put(True)
                        elif line.startswith(b"-ERR"):
                            print(f"nats: {line.decode(errors='replace')}", flush=True)
                        # +OK, INFO: ignore
                buf = buf[pos:]
                pos = 0
                chunk = sock.recv(1 << 20)
                now = time.time()
                if not chunk:
                    return
                buf += chunk
        except OSError:
            if not self.closed:
                raise


def stream_info(nc, stream):
    """JetStream stream info, or None if the stream does not exist (yet)."""
    try:
        info = nc.request_json(f"$JS.API.STREAM.INFO.{stream}", timeout=5.0)
    except NatsError:
        return None
    if "error" in info:
        return None
    return info
