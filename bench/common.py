"""What every bench section shares: child processes, the raw socket API, statistics, tables.

Every process started here is stopped on the way out (an ExitStack the caller owns), on failure
and on Ctrl-C too, and on Linux also if the bench is killed outright (PR_SET_PDEATHSIG). Children
get a clean environment: none of our PYTHON*, COVERAGE_* or AEMAGENT_* variables, and
PYTHONPYCACHEPREFIX in the bench's temp dir, so that every Python start uses fresh bytecode as an
installed package does.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin/: python, aem-token, aemagent
PY = sys.executable
TOKEN_REQUEST = (
    b"GET /v1/token HTTP/1.1\r\nHost: aemagent\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
)
STEP_TIMEOUT = 30.0


class BenchError(Exception):
    pass


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


@dataclass
class Context:
    """The run's temp dir, its ExitStack, and whether this is a --quick smoke run."""

    tmp: Path
    stack: contextlib.ExitStack
    quick: bool
    counter: list[int] = field(default_factory=lambda: [0])

    def fresh_dir(self, prefix: str) -> Path:
        """A new subdirectory of the temp dir (short names: socket paths are limited)."""
        self.counter[0] += 1
        path = self.tmp / f"{prefix}{self.counter[0]}"
        path.mkdir(mode=0o700)
        return path


# ---- processes


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if this script dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


DIE_WITH_PARENT = _die_with_parent if sys.platform == "linux" else None


def child_env(tmp: Path, sock: str) -> dict[str, str]:
    drop = ("PYTHON", "COVERAGE_", "AEMAGENT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    env["AEMAGENT_SOCK"] = sock
    # A config file the bench does not control must not change what is measured.
    env["AEMAGENT_CONFIG"] = str(tmp / "no-config.toml")
    return env


@contextlib.contextmanager
def started(
    argv: list[str], env: dict[str, str], log: Path, *, stdout: int | None = None
) -> Iterator[subprocess.Popen]:
    with log.open("ab") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else err,
            stderr=err,
            env=env,
            preexec_fn=DIE_WITH_PARENT,  # noqa: PLW1509 (the bench runs no threads meanwhile)
        )
    try:
        yield proc
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_emulator(
    stack: contextlib.ExitStack, tmp: Path, env: dict[str, str], *extra: str
) -> dict:
    """{"url", "credentials": {"service": path, ...}, ...} of a fresh emulator on loopback."""
    argv = [str(BIN / "aemagent"), "emulator", "--port", "0"]
    argv += ["--write-credentials", str(tmp / "credentials"), *extra]
    proc = stack.enter_context(started(argv, env, tmp / "emulator.log", stdout=subprocess.PIPE))
    ready, _, _ = select.select([proc.stdout], [], [], STEP_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise BenchError(f"the emulator did not start: {tail(tmp / 'emulator.log')}")
    return json.loads(line)


@dataclass
class Agent:
    proc: subprocess.Popen
    pid: int
    sock: str
    log: Path


def start_agent(
    stack: contextlib.ExitStack,
    tmp: Path,
    env: dict[str, str],
    *extra: str,
    log_name: str = "agent.log",
    timeout: float = STEP_TIMEOUT,
    under: tuple[str, ...] = (),
) -> Agent:
    """`aemagent serve` on env's AEMAGENT_SOCK (run `under` a tool such as strace, if given),
    once /v1/health answers; the Agent's pid is the daemon's own."""
    sock = env["AEMAGENT_SOCK"]
    argv = [*under, str(BIN / "aemagent"), "serve", "--socket", sock, *extra]
    log = tmp / log_name
    proc = stack.enter_context(started(argv, env, log))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the agent exited ({proc.returncode}): {tail(log)}")
        with contextlib.suppress(OSError):
            _, body = http_over_unix(sock, b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
            return Agent(proc, json.loads(body)["pid"], sock, log)
        time.sleep(0.02)
    raise BenchError(f"no agent answered on {sock}")


def tail(log: Path, lines: int = 5) -> str:
    """The end of a child's log, for an error message (the temp dir is gone afterwards)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run `aemagent ARGS`; its stdout. Raises BenchError if it fails."""
    argv = [str(BIN / "aemagent"), *args]
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


# ---- the socket API, with a raw AF_UNIX socket: the cost of the daemon, not of a client library


def http_over_unix(sock_path: str, request: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(STEP_TIMEOUT)
        s.connect(sock_path)
        s.sendall(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def api(sock_path: str, method: str, target: str, body: object = None) -> tuple[int, dict]:
    """One JSON request to the agent: (status, decoded answer)."""
    data = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {target} HTTP/1.1\r\nHost: a\r\nContent-Length: {len(data)}\r\n"
    if data:
        head += "Content-Type: application/json\r\n"
    status, answer = http_over_unix(sock_path, head.encode() + b"\r\n" + data)
    return status, json.loads(answer) if answer.strip() else {}


def get_token(sock_path: str, request: bytes = TOKEN_REQUEST) -> float:
    """Seconds for one `GET /v1/token` on a new connection, as aem-token makes it."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(STEP_TIMEOUT)
        s.connect(sock_path)
        s.sendall(request)
        data = s.recv(65536)
        while chunk := s.recv(65536):
            data += chunk
    elapsed = time.perf_counter() - t0
    if not data.startswith(b"HTTP/1.1 200 "):
        raise BenchError(f"GET /v1/token: {data[:80]!r}")
    return elapsed


# ---- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {
        m[1]: int(m[2]) for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE)
    }
    return kib["VmRSS"], kib["VmHWM"]


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches over all of a process's threads."""
    voluntary = involuntary = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            counts = dict(re.findall(r"^(\w+)_ctxt_switches:\s+(\d+)", status, re.MULTILINE))
            voluntary += int(counts["voluntary"])
            involuntary += int(counts["nonvoluntary"])
    return voluntary, involuntary


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pin(pid: int, cpu: int | None) -> bool:
    """Pin a process (all its threads; 0 is this one) to one CPU where the machine has more than
    one; `cpu` None unpins it (every CPU)."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        return False
    cpus = set(range(os.cpu_count() or 1)) if cpu is None else {cpu}
    for task in os.listdir(f"/proc/{pid or os.getpid()}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)
    return True


def wait_for(condition: Callable[[], object], what: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- statistics and the report


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(times: list[float]) -> dict:
    ordered = sorted(times)
    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "stddev": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "min": ordered[0],
        "max": ordered[-1],
        "p99": percentile(ordered, 0.99),
        "n": len(ordered),
    }


def ms(seconds: float) -> str:
    x = seconds * 1e3
    return f"{x:.3f} ms" if x < 1 else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def ms_range(s: dict) -> str:
    """'median (min to max)' of a stats() dict."""
    return f"{ms(s['median'])} ({ms(s['min'])} to {ms(s['max'])})"


def ratio(x: float) -> str:
    return f"x{x:.2f}" if x < 10 else f"x{x:.1f}" if x < 100 else f"x{x:.0f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One performance target and what this run measured for it."""

    what: str  # "aem-token vs python -c pass"
    target: str  # "≤ x1.30"
    measured: str  # "x1.12 (13.1 ms vs 11.7 ms)"
    met: bool


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return {
        "cpus": os.cpu_count(),
        "cpu": model[1].strip() if model else platform.processor() or "unknown CPU",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
