"""HTTP/1.1 load on a Unix socket: loadgen.c, built on first use, or a pure-Python stand-in.

    from loadgen import run_load          # with bench/ on sys.path
    run_load("/tmp/x/agent.sock", 64, mode="keepalive", duration=5.0)

    python bench/loadgen.py --unix PATH --clients N [--duration S | --requests TOTAL]
        [--mode close|keepalive] [--request STRING] [--cpu K] [--warmup S] [--timeout S]

The C program is compiled with $CC, cc, gcc or clang into a cache directory keyed by the
source's hash. Without a compiler (or with AEMAGENT_BENCH_NO_CC=1) the same load comes from
Python (bench/pyloadgen.py): one process per CPU, each running its share of the clients on a
selector. It gives the same result shape and semantics, but it is slower: see "generator" in the
result.

Result: {"mode", "clients", "requests" (successful, in the window), "seconds" (the window), "rps",
"p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms" (null without a success), "errors",
"error_kinds" ({"connect"|"closed"|"timeout"|"malformed"|"status NNN": count}), "reconnects",
"first_body" (the first 200 characters of the first 200 response's body), "generator"}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from pyloadgen import LoadgenError, Spec, run_python

SOURCE = Path(__file__).resolve().with_name("loadgen.c")
DEFAULT_REQUEST = "GET /v1/token HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"
NO_CC_ENV = "AEMAGENT_BENCH_NO_CC"


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
        return run_python(
            os.fspath(sock),
            clients,
            Spec(mode == "keepalive", os.fsencode(text), timeout, warmup, duration, requests),
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
