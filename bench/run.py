"""Benchmarks: aem-token start-up, served vs. exchanged tokens, daemon throughput, daemon memory.

    python bench/run.py [--quick] [--write docs/BENCHMARKS.md]

Everything runs in a fresh temp dir: the IMS emulator, an agent on a private socket, and the
emulator's service credential loaded into it. Every process started here is stopped on the way
out, on failure and on Ctrl-C too (and, on Linux, if this script is killed outright). Times are
reported as medians and as ratios to a baseline measured in the same run, because these machines
are shared and noisy: compare ratios, not absolute numbers across runs.

Children get a clean environment: no PYTHON*, COVERAGE_* or AEMAGENT_* variables from ours, and
PYTHONPYCACHEPREFIX in the temp dir, so every Python start uses fresh bytecode as an installed
package does (a checkout with stale __pycache__ and PYTHONDONTWRITEBYTECODE=1 recompiles on
every run and measures that instead).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import http.client
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import jwt

BIN = Path(sys.executable).parent  # the venv's bin/: python, aem-token, aemagent
PY = sys.executable
TOKEN_REQUEST = (
    b"GET /v1/token HTTP/1.1\r\nHost: aemagent\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
)
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
STEP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Plan:
    runs: int  # runs per command, in all
    rounds: int  # ... split into this many rounds over all commands
    warmup: int  # per command and round
    served: int  # GET /v1/token requests, one after another
    exchanges: int  # JWT exchanges against the emulator
    seconds: float  # per concurrency level
    concurrency: tuple[int, ...]
    profiles: int  # extra profiles loaded for the memory rows
    idle: int  # idle connections held open


FULL = Plan(100, 5, 3, 2000, 50, 5.0, (1, 8, 64), 50, 1000)
QUICK = Plan(5, 1, 1, 200, 5, 0.5, (1, 8, 64), 3, 100)


class BenchError(Exception):
    pass


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
    return env


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], log: Path, *, stdout: int | None = None):
    with log.open("ab") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else err,
            stderr=err,
            env=env,
            preexec_fn=DIE_WITH_PARENT,  # noqa: PLW1509 (no threads run yet)
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()


def start_emulator(stack: contextlib.ExitStack, tmp: Path, env: dict[str, str]) -> dict:
    argv = [str(BIN / "aemagent"), "emulator", "--port", "0"]
    argv += ["--write-credentials", str(tmp / "credentials")]
    proc = stack.enter_context(started(argv, env, tmp / "emulator.log", stdout=subprocess.PIPE))
    ready, _, _ = select.select([proc.stdout], [], [], STEP_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    if not line:
        raise BenchError(f"the emulator did not start: {tail(tmp / 'emulator.log')}")
    return json.loads(line)


def start_agent(stack: contextlib.ExitStack, tmp: Path, env: dict[str, str]) -> int:
    sock = env["AEMAGENT_SOCK"]
    argv = [str(BIN / "aemagent"), "serve", "--socket", sock]
    proc = stack.enter_context(started(argv, env, tmp / "agent.log"))
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the agent exited ({proc.returncode}): {tail(tmp / 'agent.log')}")
        with contextlib.suppress(OSError):
            _, body = http_over_unix(sock, b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n")
            return json.loads(body)["pid"]
        time.sleep(0.05)
    raise BenchError(f"no agent answered on {sock}")


def tail(log: Path, lines: int = 5) -> str:
    """The end of a child's log, for an error message (the temp dir is gone afterwards)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def cli(env: dict[str, str], *args: str) -> None:
    argv = [str(BIN / "aemagent"), *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} failed: {done.stderr.strip()}")


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


def get_token(sock_path: str) -> float:
    """Seconds for one `GET /v1/token` on a new connection, as aem-token makes it."""
    t0 = time.perf_counter()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(STEP_TIMEOUT)
        s.connect(sock_path)
        s.sendall(TOKEN_REQUEST)
        data = s.recv(65536)
        while chunk := s.recv(65536):
            data += chunk
    elapsed = time.perf_counter() - t0
    if not data.startswith(b"HTTP/1.1 200 "):
        raise BenchError(f"GET /v1/token: {data[:80]!r}")
    return elapsed


# ---- 1. helper start-up


def startup(plan: Plan, env: dict[str, str], tmp: Path) -> tuple[list[dict], str, str]:
    """[{name, median, mean, stddev}] with the baseline first; the method; the command line.

    hyperfine times one command's runs back to back, so a noisy neighbour that is busy for a
    second skews one command. The runs are split into rounds over all commands, and pooled.
    """
    commands = [
        ("python -c pass", [PY, "-c", "pass"]),
        ("aem-token", [str(BIN / "aem-token")]),
        ("aem-token --format header", [str(BIN / "aem-token"), "--format", "header"]),
        ("aem-token --format json", [str(BIN / "aem-token"), "--format", "json"]),
        ('python -c "import trio"', [PY, "-c", "import trio"]),
        ('python -c "import httpx"', [PY, "-c", "import httpx"]),
        ("aemagent status", [str(BIN / "aemagent"), "status"]),
    ]
    for _, argv in commands:  # a failing command would time its error path
        subprocess.run(argv, env=env, capture_output=True, check=True, timeout=STEP_TIMEOUT)
    runs = max(2, plan.runs // plan.rounds)
    hyperfine = shutil.which("hyperfine")
    out = tmp / "hyperfine.json"
    argv = ["hyperfine", "-N", "--warmup", str(plan.warmup), "--runs", str(runs)]
    argv += ["--style", "none", "--export-json", str(out)]
    for name, cmd in commands:
        argv += ["-n", name, shlex.join(cmd)]
    rounds: list[list[list[float]]] = []  # [round][command] -> seconds per run
    for _ in range(plan.rounds):
        if hyperfine:
            subprocess.run(
                argv, env=env, check=True, stdout=subprocess.DEVNULL, preexec_fn=DIE_WITH_PARENT
            )
            rounds.append([r["times"] for r in json.loads(out.read_text())["results"]])
            continue
        rounds.append([])
        for _, cmd in commands:
            rounds[-1].append([])
            for i in range(plan.warmup + runs):
                t0 = time.perf_counter()
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
                if i >= plan.warmup:
                    rounds[-1][-1].append(time.perf_counter() - t0)
    rows = [
        {
            "name": name,
            **_stats([t for r in rounds for t in r[i]]),
            "rounds": [statistics.median(r[i]) for r in rounds],
        }
        for i, (name, _) in enumerate(commands)
    ]
    if not hyperfine:
        method = "a subprocess.run loop (hyperfine NOT FOUND; this adds Python's fork/exec cost)"
        return rows, method, f"{plan.rounds} rounds of {runs} runs per command"
    version = subprocess.run(["hyperfine", "--version"], capture_output=True, text=True, check=True)
    # The same command line, readable: `python`, `aem-token` and `aemagent` are the venv's.
    shown = shlex.join(argv[:4]) + f" --runs {runs} --export-json OUT.json "
    shown += " ".join(f"'{name}'" for name, _ in commands)
    if plan.rounds > 1:
        shown = f"# {plan.rounds} times; each command's times pooled\n{shown}"
    return rows, f"`{version.stdout.strip()}`", shown


def _stats(times: list[float]) -> dict:
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "stddev": statistics.stdev(times) if len(times) > 1 else 0.0,
    }


# ---- 2. a served token vs. a JWT exchange on every run


def served_vs_exchange(plan: Plan, sock: str, ims: str, credential: Path) -> dict:
    for _ in range(20):
        get_token(sock)
    served = [get_token(sock) for _ in range(plan.served)]
    integ = json.loads(credential.read_text())["integration"]
    account, url = integ["technicalAccount"], urllib.parse.urlsplit(ims)
    sign, post, total = [], [], []
    for _ in range(plan.exchanges):
        t0 = time.perf_counter()
        now = int(time.time())
        claims = {"exp": now + 300, "iat": now, "iss": integ["org"], "sub": integ["id"]}
        claims["aud"] = f"{ims}/c/{account['clientId']}"
        claims.update({f"{ims}/s/{scope}": True for scope in integ["metascopes"].split(",")})
        # What a script that exchanges on every run does: the PEM key is parsed by pyjwt here.
        assertion = jwt.encode(claims, integ["privateKey"], algorithm="RS256")
        t1 = time.perf_counter()
        form = {"client_id": account["clientId"], "client_secret": account["clientSecret"]}
        form["jwt_token"] = assertion
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=STEP_TIMEOUT)
        try:
            conn.request(
                "POST",
                "/ims/exchange/jwt",
                urllib.parse.urlencode(form),
                {"Content-Type": "application/x-www-form-urlencoded"},
            )
            answer = conn.getresponse()
            body = answer.read()
        finally:
            conn.close()
        t2 = time.perf_counter()
        if answer.status != 200 or b"access_token" not in body:
            raise BenchError(f"JWT exchange: HTTP {answer.status} {body[:200]!r}")
        sign.append(t1 - t0)
        post.append(t2 - t1)
        total.append(t2 - t0)
    return {"served": served, "total": total, "sign": sign, "post": post}


# ---- 3. throughput under concurrency


def hammer(sock: str, pid: int, clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    gate = threading.Barrier(clients + 1)
    deadline = 0.0

    def client(i: int) -> None:
        gate.wait()
        while time.perf_counter() < deadline:
            try:
                latencies[i].append(get_token(sock))
            except (OSError, BenchError):
                errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    cpu0, mine0 = cpu_seconds(pid), time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    gate.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu, mine = cpu_seconds(pid) - cpu0, time.process_time() - mine0
    every = sorted(x for xs in latencies for x in xs)
    if not every:
        raise BenchError(f"no request succeeded with {clients} connections")
    return {
        "clients": clients,
        "rps": len(every) / wall,
        "p50": percentile(every, 0.50),
        "p99": percentile(every, 0.99),
        "daemon_cpu": cpu / wall,
        "client_cpu": mine / wall,
        "errors": sum(errors),
    }


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# ---- 4. memory


def memory(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    kib = {
        m[1]: int(m[2]) for m in re.finditer(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.MULTILINE)
    }
    return kib["VmRSS"], kib["VmHWM"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(condition, what: str, timeout: float = STEP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


def memory_rows(plan: Plan, env: dict[str, str], pid: int, credential: Path) -> list[tuple]:
    rows = [("after the latency and throughput runs", *memory(pid))]
    for i in range(1, plan.profiles + 1):
        cli(env, "add", str(credential), "--name", f"p{i}")
    rows.append(
        (
            f"{1 + plan.profiles} profiles (one credential under {plan.profiles + 1} names)",
            *memory(pid),
        )
    )
    sock, before = env["AEMAGENT_SOCK"], open_fds(pid)
    for again in ("", " again"):  # twice: what the first round leaves behind is reused
        conns: list[socket.socket] = []
        try:
            for _ in range(plan.idle):
                conns.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                conns[-1].connect(sock)
            wait_for(lambda: open_fds(pid) >= before + plan.idle, "the agent to accept")
            rss = memory(pid)
            # Still serving with every idle connection held (the cap is 1024).
            status, _ = http_over_unix(
                sock, b"GET /v1/token?profile=p1 HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            if status != 200:
                raise BenchError(f"no token while holding {plan.idle} connections: HTTP {status}")
            rows.append((f"holding {plan.idle} idle connections{again}", *rss))
        finally:
            for c in conns:
                c.close()
        wait_for(lambda: open_fds(pid) <= before, "the agent to close its connections")
        time.sleep(0.5)
        rows.append((f"after they closed{again}", *memory(pid)))
    return rows


# ---- the report


def ms(seconds: float) -> str:
    x = seconds * 1e3
    return f"{x:.3f} ms" if x < 1 else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def ratio(x: float) -> str:
    return f"x{x:.2f}" if x < 10 else f"x{x:.1f}" if x < 100 else f"x{x:.0f}"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(r: dict) -> str:
    plan: Plan = r["plan"]
    base = r["startup"][0]["median"]
    token = r["startup"][1]["median"]
    per_round = zip(r["startup"][1]["rounds"], r["startup"][0]["rounds"], strict=True)
    spread = ", ".join(f"{(t - b) * 1e3:+.1f} ms" for t, b in per_round)
    startup_rows = [
        [
            f"`{row['name']}`" + (" (baseline)" if i == 0 else ""),
            ms(row["median"]),
            f"{ms(row['mean'])} ± {ms(row['stddev'])}",
            ratio(row["median"] / base),
            "" if i == 0 else f"{(row['median'] - base) * 1e3:+.1f} ms",
        ]
        for i, row in enumerate(r["startup"])
    ]
    s = r["served"]
    served = statistics.median(s["served"])
    served_rows = [
        [
            f"`GET /v1/token` over the socket, a new connection each ({len(s['served'])} in a row)",
            ms(served),
            ms(percentile(sorted(s["served"]), 0.99)),
            "x1 (baseline)",
        ]
    ]
    for key, what in [
        ("total", f"JWT exchange with the emulator over loopback ({len(s['total'])} in a row)"),
        ("sign", "↳ build and sign the JWT (pyjwt, parsing the PEM key)"),
        ("post", "↳ POST it on a new connection and read the token"),
    ]:
        median = statistics.median(s[key])
        p99 = ms(percentile(sorted(s[key]), 0.99))
        served_rows.append([what, ms(median), p99, ratio(median / served)])
    load = r["load"]
    one = load[0]["p50"]
    load_rows = [
        [
            str(x["clients"]),
            f"{x['rps']:,.0f}",
            ms(x["p50"]),
            ms(x["p99"]),
            ratio(x["p50"] / one),
            f"{x['daemon_cpu']:.0%}",
            f"{x['client_cpu']:.0%}",
            str(x["errors"]),
        ]
        for x in load
    ]
    idle_rss = r["memory"][0][1]
    memory_rows = [
        [what, f"{rss / 1024:.1f} MiB", f"{hwm / 1024:.1f} MiB", ratio(rss / idle_rss)]
        for what, rss, hwm in r["memory"]
    ]
    m = r["machine"]
    return "\n".join(
        [
            f"Measured {r['date']} on {m['cpus']} CPUs ({m['cpu']}), {m['os']}, Python "
            f"{m['python']}; load average {m['load']} at the start."
            + (" **--quick run: too few iterations to quote.**" if r["quick"] else ""),
            "",
            f"Command: `{r['command']}`",
            "",
            f"### aem-token start-up ({plan.runs} runs each, in {plan.rounds} round"
            + "s" * (plan.rounds > 1)
            + ")",
            "",
            table(["command", "median", "mean ± sd", "x baseline", "- baseline"], startup_rows),
            "",
            (
                f"**aem-token costs {(token - base) * 1e3:+.1f} ms over the bare interpreter "
                f"({ratio(token / base)}).** Round by round: {spread}. Timed with {r['method']}:"
            ),
            "",
            "```sh",
            r["startup_command"],
            "```",
            "",
            "### A served token vs. a JWT exchange on every run",
            "",
            table(["what", "median", "p99", "x served"], served_rows),
            "",
            f"### Daemon throughput ({plan.seconds:g} s per row; client threads in one process)",
            "",
            table(
                [
                    "connections",
                    "requests/s",
                    "p50",
                    "p99",
                    "p50 x 1 conn",
                    "daemon CPU",
                    "client CPU",
                    "errors",
                ],
                load_rows,
            ),
            "",
            "### Daemon memory (/proc/PID/status)",
            "",
            table(["daemon state", "VmRSS", "VmHWM (peak)", "RSS x idle"], memory_rows),
        ]
    )


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


def write_report(path: Path, text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    if not path.exists():
        path.write_text(f"# Benchmarks\n\n{block}\n")
        return
    old = path.read_text()
    if BEGIN not in old or END not in old:
        raise BenchError(f"{path} has no {BEGIN} … {END} block to replace")
    head, _, rest = old.partition(BEGIN)
    path.write_text(head + block + rest.partition(END)[2])


# ---- main


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def run(plan: Plan, tmp: Path, stack: contextlib.ExitStack) -> dict:
    env = child_env(tmp, str(tmp / "agent.sock"))
    result: dict = {"plan": plan, "machine": machine()}
    say("starting the IMS emulator and the agent")
    emulator = start_emulator(stack, tmp, env)
    pid = start_agent(stack, tmp, env)
    credential = Path(emulator["credentials"]["service"])
    cli(env, "add", str(credential))
    idle = [("idle, 1 profile", *memory(pid))]
    say(f"start-up: {plan.runs} runs of 7 commands")
    result["startup"], result["method"], result["startup_command"] = startup(plan, env, tmp)
    say(f"served: {plan.served} socket requests, {plan.exchanges} JWT exchanges")
    result["served"] = served_vs_exchange(plan, env["AEMAGENT_SOCK"], emulator["url"], credential)
    result["load"] = []
    for clients in plan.concurrency:
        say(f"throughput: {clients} connections for {plan.seconds:g} s")
        result["load"].append(hammer(env["AEMAGENT_SOCK"], pid, clients, plan.seconds))
    say(f"memory: {plan.profiles} more profiles, {plan.idle} idle connections")
    result["memory"] = idle + memory_rows(plan, env, pid, credential)
    return result


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument("--write", metavar="FILE", type=Path, help="update FILE's results block")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    fds = raise_fd_limit(plan.idle + 256)  # before the agent starts: it inherits the limit
    if fds < plan.idle + 64:
        plan = Plan(**{**plan.__dict__, "idle": max(0, fds - 64)})
        say(f"RLIMIT_NOFILE is {fds}: holding only {plan.idle} idle connections")
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aemb-")))
            result = run(plan, tmp, stack)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.SubprocessError as exc:  # failed or hung; hyperfine said why on stderr
        print(f"bench: error: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    now = dt.datetime.now(dt.UTC)
    result.update(date=now.strftime("%Y-%m-%d %H:%M UTC"), quick=args.quick, command=command)
    text = report(result)
    print(text)
    if args.write:
        write_report(args.write, text)
        say(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
