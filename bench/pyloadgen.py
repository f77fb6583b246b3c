"""The Python load generator: loadgen.c's state machine, on a selector per process.

bench/loadgen.py falls back to it without a C compiler (or with AEMAGENT_BENCH_NO_CC=1): one
process per CPU, each running its share of the clients. It gives the same result shape and
semantics as loadgen.c (bench/loadgen.py describes them), but it is slower.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import selectors
import socket
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Any

BUF_SIZE = 65536
FOREVER = float("inf")


class LoadgenError(Exception):
    pass


@dataclass(frozen=True)
class Spec:
    keepalive: bool
    request: bytes
    timeout: float
    warmup: float
    duration: float | None
    requests: int | None


class _Conn:
    __slots__ = (
        "backoff",
        "body_len",
        "buf",
        "deadline",
        "head_len",
        "retry_at",
        "reused",
        "server_close",
        "sock",
        "started_write",
        "state",
        "status",
        "t_start",
        "want",
        "wpos",
    )

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.state = "idle"  # idle, queued, retry, connecting, writing, reading
        self.want = 0
        self.reused = False
        self.buf = bytearray()
        self.wpos = self.head_len = self.status = 0
        self.body_len = -1  # -1: up to EOF
        self.server_close = self.started_write = False
        self.t_start = self.deadline = self.retry_at = self.backoff = 0.0


class _Engine:
    def __init__(self, path: str, spec: Spec, nconns: int, remaining: Any) -> None:
        self.path, self.spec, self.remaining = path, spec, remaining
        self.sel = selectors.DefaultSelector()
        self.conns = [_Conn() for _ in range(nconns)]
        self.queue: list[_Conn] = []
        self.lat = array("d")
        self.errors: Counter[str] = Counter()
        self.reconnects = 0
        self.first_body: str | None = None
        self.by_requests = False
        self.count_from = self.end = FOREVER
        self.active = 0

    # -- phases

    def take(self, t: float) -> bool:
        if not self.by_requests:
            return t < self.end
        with self.remaining.get_lock():
            if self.remaining.value <= 0:
                return False
            self.remaining.value -= 1
            return True

    def run_phase(self, initial: int) -> float:
        """Starts `initial` clients (already taken) and the rest while `take` allows."""
        self.active, next_scan = 0, 0.0
        for conn in self.conns:
            if not (initial > 0 or self.take(time.monotonic())):
                break
            initial -= 1
            self.active += 1
            self.start(conn)
        while True:
            if self.queue:
                queued, self.queue = self.queue, []
                for conn in queued:
                    self.start(conn)
            t = time.monotonic()
            if self.active == 0 or (not self.by_requests and t >= self.end):
                for conn in self.conns:
                    self.close(conn)
                    conn.state = "idle"
                return t
            if t >= next_scan:
                next_scan = self.scan(t)
                continue
            wait = 0.0 if self.queue else max(0.0, min(next_scan, self.end) - t)
            for key, _ in self.sel.select(wait):
                conn = key.data
                if conn.state == "connecting":
                    self.finish_connect(conn)
                elif conn.state == "writing":
                    self.write(conn)
                elif conn.state == "reading":
                    self.read(conn)

    def scan(self, t: float) -> float:
        """Timeouts and connect retries; returns when to scan again."""
        next_scan = t + 0.005
        for conn in self.conns:
            if conn.state not in ("retry", "connecting", "writing", "reading"):
                continue
            if t >= conn.deadline:
                connecting = conn.state in ("retry", "connecting")
                self.close(conn)
                self.fail(conn, "connect" if connecting else "timeout")
            elif conn.state == "retry":
                if t >= conn.retry_at:
                    self.open(conn)
                else:
                    next_scan = min(next_scan, conn.retry_at)
        return next_scan

    # -- one client

    def register(self, conn: _Conn, want: int) -> None:
        if conn.want == want:
            return
        assert conn.sock is not None
        if conn.want:
            self.sel.modify(conn.sock, want, conn)
        else:
            self.sel.register(conn.sock, want, conn)
        conn.want = want

    def close(self, conn: _Conn) -> None:
        if conn.sock is not None:
            if conn.want:
                self.sel.unregister(conn.sock)
            conn.sock.close()
            conn.sock, conn.want = None, 0
        conn.reused = False

    def next(self, conn: _Conn, t: float, keep: bool, direct: bool) -> None:
        if not keep:
            self.close(conn)
        if not self.take(t):
            self.close(conn)
            conn.state = "idle"
            self.active -= 1
            return
        if self.spec.keepalive and not keep and t >= self.count_from:
            self.reconnects += 1
        if direct:
            self.start(conn)
        else:  # after an error: a client failing at once must not recurse
            conn.state = "queued"
            self.queue.append(conn)

    def fail(self, conn: _Conn, kind: str) -> None:
        t = time.monotonic()
        if t >= self.count_from:
            self.errors[kind] += 1
        self.next(conn, t, keep=False, direct=False)

    def start(self, conn: _Conn) -> None:
        conn.buf = bytearray()
        conn.wpos = conn.head_len = conn.status = 0
        conn.body_len = -1
        conn.server_close = conn.started_write = False
        conn.t_start = time.monotonic()
        conn.deadline = conn.t_start + self.spec.timeout
        conn.backoff = 0.001
        if conn.sock is None:
            self.open(conn)
        else:
            self.write(conn)

    def open(self, conn: _Conn) -> None:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self.fail(conn, "connect")
            return
        s.setblocking(False)
        conn.sock, conn.reused = s, False
        code = s.connect_ex(self.path)
        if code == 0:
            conn.state = "writing"
            self.write(conn)
        elif code in (errno.EINPROGRESS, errno.EINTR):
            conn.state = "connecting"
            self.register(conn, selectors.EVENT_WRITE)
        elif _retryable(code):
            self.schedule_retry(conn)
        else:
            self.fail(conn, "connect")

    def schedule_retry(self, conn: _Conn) -> None:
        """A full listen backlog: connect again a little later, until the request's deadline."""
        self.close(conn)
        conn.state = "retry"
        conn.retry_at = time.monotonic() + conn.backoff
        conn.backoff = min(conn.backoff * 2, 0.032)

    def finish_connect(self, conn: _Conn) -> None:
        assert conn.sock is not None
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            conn.state = "writing"
            self.write(conn)
        elif _retryable(code):
            self.schedule_retry(conn)
        else:
            self.fail(conn, "connect")

    def write(self, conn: _Conn) -> None:
        assert conn.sock is not None
        if not conn.started_write:
            conn.started_write = True
            if self.spec.keepalive:
                conn.t_start = time.monotonic()
        request = self.spec.request
        while conn.wpos < len(request):
            try:
                conn.wpos += conn.sock.send(request[conn.wpos :])
            except (BlockingIOError, InterruptedError):
                conn.state = "writing"
                self.register(conn, selectors.EVENT_WRITE)
                return
            except OSError:
                self.peer_closed(conn)
                return
        conn.state = "reading"
        self.register(conn, selectors.EVENT_READ)

    def peer_closed(self, conn: _Conn) -> None:
        """The server closed the connection before a byte of the response."""
        if self.spec.keepalive and conn.reused and not conn.buf:
            self.close(conn)  # a kept-alive connection it had closed: again on a new one
            if time.monotonic() >= self.count_from:
                self.reconnects += 1
            conn.wpos = 0
            self.open(conn)
            return
        self.fail(conn, "closed")

    def read(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(BUF_SIZE - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.peer_closed(conn)
            return
        if not data:
            if conn.head_len and conn.body_len < 0:  # a body delimited by the close
                conn.server_close = True
                self.complete(conn)
            else:
                self.peer_closed(conn)
            return
        conn.buf += data
        result = self.parse(conn)
        if result > 0:
            self.complete(conn)
        elif result < 0 or len(conn.buf) >= BUF_SIZE:
            self.fail(conn, "malformed")

    def parse(self, conn: _Conn) -> int:
        """1: a complete response; 0: more bytes needed; -1: malformed or too large."""
        buf = conn.buf
        if not conn.head_len:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return 0
            conn.head_len = end + 4
            head = _parse_head(bytes(buf[:end]), head_only=self.spec.request.startswith(b"HEAD "))
            if head is None:
                return -1
            conn.status, conn.body_len, conn.server_close = head
            if conn.body_len >= 0 and conn.head_len + conn.body_len > BUF_SIZE:
                return -1
        if conn.body_len < 0:
            return 0
        total = conn.head_len + conn.body_len
        if len(buf) < total:
            return 0
        return -1 if len(buf) > total and self.spec.keepalive else 1

    def complete(self, conn: _Conn) -> None:
        t = time.monotonic()
        if conn.status == 200:
            if self.first_body is None:
                end = len(conn.buf) if conn.body_len < 0 else conn.head_len + conn.body_len
                body = bytes(conn.buf[conn.head_len : min(end, conn.head_len + 800)])
                self.first_body = body.decode("utf-8", "replace")[:200]
            if t >= self.count_from:
                self.lat.append(t - conn.t_start)
        elif t >= self.count_from:
            self.errors[f"status {conn.status:03d}"] += 1
        conn.reused = True
        total = conn.head_len + conn.body_len
        keep = self.spec.keepalive and not conn.server_close and len(conn.buf) == total
        self.next(conn, t, keep=keep and conn.body_len >= 0, direct=True)


def _retryable(code: int) -> bool:
    """A full listen backlog: try again until the timeout (macOS says ECONNREFUSED)."""
    return code in (errno.EAGAIN, errno.EWOULDBLOCK) or (
        sys.platform == "darwin" and code == errno.ECONNREFUSED
    )


def _parse_head(head: bytes, *, head_only: bool) -> tuple[int, int, bool] | None:
    """(status, body length or -1 for up to EOF, Connection: close) or None if malformed."""
    lines = head.split(b"\r\n")
    first = lines[0]
    if len(first) < 12 or not first.startswith(b"HTTP/1.") or first[8:9] != b" ":
        return None
    code, rest = first[9:12], first[12:13]
    if not code.isdigit() or rest not in (b"", b" ") or int(code) < 200:
        return None
    status, length, close = int(code), -1, False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            return None
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 15 or (length >= 0 and length != int(value)):
                return None
            length = int(value)
        elif name == b"transfer-encoding" and value.lower() != b"identity":
            return None  # chunked is not supported
        elif name == b"connection" and b"close" in value.lower():
            close = True
    if head_only or status in (204, 304):
        length = 0
    return status, length, close


def _worker(
    path: str,
    spec: Spec,
    nconns: int,
    *,
    remaining: Any,
    barrier: Any,
    cpu: int | None,
    out: Any,
) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    engine = _Engine(path, spec, nconns, remaining)
    barrier.wait()
    t0 = time.monotonic()
    if spec.requests is not None:
        if spec.warmup > 0:
            engine.end = t0 + spec.warmup
            engine.run_phase(nconns)
            barrier.wait()  # nobody starts the burst before everybody has stopped
        engine.by_requests, engine.end = True, FOREVER
        start = engine.count_from = time.monotonic()
        stop = engine.run_phase(nconns)  # its first requests were reserved by the parent
    else:
        start = engine.count_from = t0 + spec.warmup
        engine.end = start + (spec.duration or 0.0)
        stop = engine.run_phase(nconns)
    out.send((start, stop, engine.lat, dict(engine.errors), engine.reconnects, engine.first_body))
    out.close()


def run_python(path: str, clients: int, spec: Spec, cpu: int | None) -> dict[str, Any]:
    nconns = min(clients, spec.requests) if spec.requests is not None else clients
    nprocs = 1 if cpu is not None else max(1, min(nconns, os.cpu_count() or 1))
    shares = [nconns // nprocs + (i < nconns % nprocs) for i in range(nprocs)]
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    remaining = ctx.Value("q", (spec.requests or 0) - nconns)  # the first burst is reserved
    barrier = ctx.Barrier(nprocs)
    pipes, procs = [], []
    for share in shares:
        receiver, sender = ctx.Pipe(duplex=False)
        shared = {"remaining": remaining, "barrier": barrier, "cpu": cpu, "out": sender}
        proc = ctx.Process(target=_worker, args=(path, spec, share), kwargs=shared, daemon=True)
        proc.start()
        sender.close()
        pipes.append(receiver)
        procs.append(proc)
    try:
        parts = [receiver.recv() for receiver in pipes]
    except EOFError:
        raise LoadgenError("a Python load worker died") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    seconds = max(p[1] for p in parts) - min(p[0] for p in parts)
    lat = sorted(x for p in parts for x in p[2])
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p[3])
    first = next((p[5] for p in parts if p[5] is not None), None)

    def ms(i: int) -> float | None:
        return round(lat[i] * 1e3, 3) if lat else None

    n = len(lat)
    return {
        "mode": "keepalive" if spec.keepalive else "close",
        "clients": clients,
        "requests": n,
        "seconds": round(seconds, 3),
        "rps": round(n / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": ms(int(0.50 * (n - 1) + 0.5)),
        "p90_ms": ms(int(0.90 * (n - 1) + 0.5)),
        "p99_ms": ms(int(0.99 * (n - 1) + 0.5)),
        "max_ms": ms(n - 1),
        "mean_ms": round(sum(lat) / n * 1e3, 3) if lat else None,
        "errors": sum(errors.values()),
        "error_kinds": dict(sorted(errors.items())),
        "reconnects": sum(p[4] for p in parts),
        "first_body": first,
        "generator": f"python, {nprocs} process{'es' * (nprocs > 1)}",
    }
