"""HTTP/1.1 load on a Unix socket: loadgen.c, built on first use, or a pure-Python stand-in.

    from loadgen import run_load          # with bench/ on sys.path
    run_load("/tmp/x/agent.sock", 64, mode="keepalive", duration=5.0)

    python bench/loadgen.py --unix PATH --clients N [--duration S | --requests TOTAL]
        [--mode close|keepalive] [--request STRING] [--cpu K] [--warmup S] [--timeout S]

The C program is compiled with $CC, cc, gcc or clang into a cache directory keyed by the
source's hash. Without a compiler (or with AEMAGENT_BENCH_NO_CC=1) the same load comes from
Python: one process per CPU, each running its share of the clients on a selector. It gives the
same result shape and semantics, but it is slower: see "generator" in the result.

Result: {"mode", "clients", "requests" (successful, in the window), "seconds" (the window), "rps",
"p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms" (null without a success), "errors",
"error_kinds" ({"connect"|"closed"|"timeout"|"malformed"|"status NNN": count}), "reconnects",
"first_body" (the first 200 characters of the first 200 response's body), "generator"}.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import multiprocessing
import os
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

SOURCE = Path(__file__).resolve().with_name("loadgen.c")
DEFAULT_REQUEST = "GET /v1/token HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"
NO_CC_ENV = "AEMAGENT_BENCH_NO_CC"
BUF_SIZE = 65536
FOREVER = float("inf")


class LoadgenError(Exception):
    pass


# ---- the C generator


def compiler() -> list[str] | None:
    """The C compiler's command, or None (none found, or AEMAGENT_BENCH_NO_CC is set)."""
    if os.environ.get(NO_CC_ENV, "") not in ("", "0"):
        return None
    candidates = [shlex.split(os.environ["CC"])] if os.environ.get("CC") else []
    candidates += [["cc"], ["gcc"], ["clang"]]
    for argv in candidates:
        if argv and (path := shutil.which(argv[0])):
            return [path, *argv[1:]]
    return None


def _private_dir(path: Path) -> bool:
    """Make `path` (mode 0700) or accept it if it is ours and nobody else can write to it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def build(build_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The compiled loadgen, built only if not yet there; None without a C compiler."""
    cc = compiler()
    if cc is None:
        return None
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    if build_dir:
        where = Path(build_dir)
    else:
        where = Path(tempfile.gettempdir()) / f"aemagent-bench-loadgen-{digest}"
    if not _private_dir(where):  # e.g. someone else's directory in a shared /tmp
        where = Path(tempfile.mkdtemp(prefix=f"aemagent-bench-loadgen-{digest}-"))
    binary = where / f"loadgen-{digest}"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    partial = where / f".loadgen-{digest}.{os.getpid()}"
    argv = [*cc, "-O2", "-Wall", "-Wextra", "-o", str(partial), str(SOURCE)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise LoadgenError(f"{shlex.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    partial.replace(binary)  # atomic: a concurrent build never runs a half-written file
    return binary


def _escape(request: str) -> str:
    """The request as loadgen.c reads it, with \\r, \\n and \\\\ escapes."""
    return request.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def run_load(
    sock: str | os.PathLike[str],
    clients: int,
    *,
    mode: str = "close",
    duration: float | None = None,
    requests: int | None = None,
    request: str | bytes | None = None,
    cpu: int | None = None,
    warmup: float = 0.0,
    timeout: float = 10.0,
    build_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load `sock` with `clients` concurrent clients; the result described in the module doc.

    `request` is the raw request (real CR LF, no escapes); `duration` and `requests` exclude
    each other (neither: 5 s). A compiler error falls back to Python, with a warning.
    """
    if mode not in ("close", "keepalive"):
        raise ValueError(f"mode is close or keepalive, not {mode!r}")
    if duration is not None and requests is not None:
        raise ValueError("duration and requests exclude each other")
    if clients < 1 or (requests is not None and requests < 1):
        raise ValueError("clients and requests must be at least 1")
    if duration is None and requests is None:
        duration = 5.0
    text = os.fsdecode(request) if isinstance(request, bytes) else request  # argv: the same bytes
    text = text if text is not None else DEFAULT_REQUEST
    try:
        binary = build(build_dir)
    except LoadgenError as exc:
        print(f"loadgen: {exc}; using the Python generator", file=sys.stderr)
        binary = None
    if binary is None:
        return _run_python(
            os.fspath(sock),
            clients,
            _Spec(mode == "keepalive", os.fsencode(text), timeout, warmup, duration, requests),
            cpu,
        )
    argv = [str(binary), "--unix", os.fspath(sock), "--clients", str(clients), "--mode", mode]
    argv += ["--request", _escape(text), "--warmup", repr(warmup), "--timeout", repr(timeout)]
    if requests is not None:
        argv += ["--requests", str(requests)]
    else:
        argv += ["--duration", repr(duration)]
    argv += ["--cpu", str(cpu)] if cpu is not None else []
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LoadgenError(f"loadgen exited {done.returncode}: {done.stderr.strip()}")
    return {**json.loads(done.stdout), "generator": "C (loadgen.c)"}


# ---- the Python generator: the same state machine as loadgen.c, on a selector per process


@dataclass(frozen=True)
class _Spec:
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
    def __init__(self, path: str, spec: _Spec, nconns: int, remaining: Any) -> None:
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
    spec: _Spec,
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


def _run_python(path: str, clients: int, spec: _Spec, cpu: int | None) -> dict[str, Any]:
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


# ---- command line: the same flags as loadgen.c


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"loadgen: {message} (try --help)\n")


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 2] in ("r", "n", "\\"):
            out.append({"r": "\r", "n": "\n", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unix", required=True, metavar="PATH")
    parser.add_argument("--clients", required=True, type=int, metavar="N")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--duration", type=float, metavar="SECONDS")
    group.add_argument("--requests", type=int, metavar="TOTAL")
    parser.add_argument("--mode", choices=("close", "keepalive"), default="close")
    parser.add_argument("--request", help=r"the raw request, with \r and \n escapes")
    parser.add_argument("--cpu", type=int, metavar="K")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--build-dir", metavar="DIR", help="where to cache the compiled loadgen")
    args = parser.parse_args(argv)
    if args.clients < 1 or (args.requests is not None and args.requests < 1):
        parser.error("--clients and --requests must be at least 1")
    if (args.duration is not None and args.duration <= 0) or args.timeout <= 0 or args.warmup < 0:
        parser.error("--duration and --timeout must be > 0, --warmup >= 0")
    request = _unescape(args.request) if args.request is not None else None
    try:
        result = run_load(
            args.unix,
            args.clients,
            mode=args.mode,
            duration=args.duration,
            requests=args.requests,
            request=request,
            cpu=args.cpu,
            warmup=args.warmup,
            timeout=args.timeout,
            build_dir=args.build_dir,
        )
    except LoadgenError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
