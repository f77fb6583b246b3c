"""Daemon start-up and memory at rest.

Start-up: `aemagent start` as users run it (`eval "$(aemagent start)"`), timed from its exec
until it returns with the shell lines, and until the socket first answers `GET /v1/health`
(a thread in the bench polls it from the exec on); then `aemagent stop`, and again. For
comparison, `aemagent serve` in the foreground, from exec until its socket answers: what the
daemon itself takes, without the CLI that spawns it and polls it.

Memory: `VmRSS` and `VmHWM` of one `aemagent serve` from /proc: idle with no profile, with one
(its first token fetched: the IMS client is loaded), after a run of token requests, with 50 more
profiles, and while holding 1000 idle connections, after they close, and the same again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from common import (
    BIN,
    STEP_TIMEOUT,
    BenchError,
    Context,
    Target,
    child_env,
    cli,
    get_token,
    http_over_unix,
    memory,
    mib,
    ms,
    open_fds,
    ratio,
    say,
    start_agent,
    start_emulator,
    started,
    stats,
    table,
    tail,
    wait_for,
)

TITLE = "Daemon start-up and memory at rest"
HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n"
POLL = 0.002  # seconds between the bench's attempts to reach the socket


@dataclass(frozen=True)
class Plan:
    starts: int  # start/stop cycles timed
    served: int  # token requests before the "after requests" row
    profiles: int  # profiles added for the "more profiles" row
    idle: int  # idle connections held open


FULL = Plan(20, 2000, 50, 1000)
QUICK = Plan(2, 100, 3, 100)


def measure(ctx: Context) -> dict:
    plan = QUICK if ctx.quick else FULL
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fds != resource.RLIM_INFINITY and fds < plan.idle + 128:
        plan = Plan(plan.starts, plan.served, plan.profiles, max(0, fds - 128))
        say(f"RLIMIT_NOFILE is {fds}: holding only {plan.idle} idle connections")
    sock = str(ctx.fresh_dir("s") / "a.sock")
    env = child_env(ctx.tmp, sock)
    env["XDG_STATE_HOME"] = str(ctx.tmp / "state")  # where `aemagent start` has its daemon log
    say(f"start-up: {plan.starts} x aemagent start / stop, {plan.starts} x aemagent serve")
    starts = [start_once(ctx, env, sock) for _ in range(plan.starts + 1)][1:]  # 1 warm-up
    serve_env = child_env(ctx.tmp, str(ctx.fresh_dir("s") / "a.sock"))
    serves = [serve_once(ctx, serve_env) for _ in range(plan.starts + 1)][1:]
    say(f"memory: 0, 1 and {plan.profiles + 1} profiles, {plan.idle} idle connections")
    mem = memory_rows(ctx, plan)
    return {
        "plan": plan.__dict__,
        "start": stats([s["returned"] for s in starts]),
        "answers": stats([s["answers"] for s in starts]),
        "stop": stats([s["stop"] for s in starts]),
        "serve": stats(serves),
        "memory": mem,
    }


# ---- start-up


def _health(sock: str) -> int | None:
    """The pid the agent on `sock` reports, or None if nothing answers."""
    import json

    try:
        status, body = http_over_unix(sock, HEALTH)
    except OSError:
        return None
    return json.loads(body)["pid"] if status == 200 else None


def _first_answer(sock: str, stop: threading.Event, out: list[float]) -> None:
    """Poll `sock` until it answers; append the perf_counter of the first answer."""
    while not stop.is_set():
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(sock)
            s.sendall(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
            if s.recv(16).startswith(b"HTTP/1.1 200"):
                out.append(time.perf_counter())
                return
        time.sleep(POLL)


def _kill(pid: int, sock: str) -> None:
    """On the way out: stop a detached daemon still serving `sock` (it is not our child)."""
    if _health(sock) == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def start_once(ctx: Context, env: dict[str, str], sock: str) -> dict:
    """One `aemagent start`, timed; then `aemagent stop`, timed."""
    if _health(sock) is not None:
        raise BenchError(f"an agent already answers on {sock}")
    answered: list[float] = []
    done = threading.Event()
    poller = threading.Thread(target=_first_answer, args=(sock, done, answered), daemon=True)
    poller.start()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "aemagent"), "start"],
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    returned = time.perf_counter() - t0
    if proc.returncode != 0:
        done.set()
        raise BenchError(f"aemagent start failed: {proc.stderr.strip()}")
    pid = int(proc.stdout.split("AEMAGENT_PID=")[1].split(";")[0])
    ctx.stack.callback(_kill, pid, sock)
    poller.join(STEP_TIMEOUT)
    done.set()
    if not answered:
        raise BenchError(f"the agent started by aemagent start did not answer on {sock}")
    t1 = time.perf_counter()
    cli(env, "stop")
    stopped = time.perf_counter() - t1
    return {"returned": returned, "answers": answered[0] - t0, "stop": stopped}


def serve_once(ctx: Context, env: dict[str, str]) -> float:
    """Seconds from the exec of `aemagent serve` until its socket answers; then stop it."""
    sock = env["AEMAGENT_SOCK"]
    argv = [str(BIN / "aemagent"), "serve", "--socket", sock]
    log = ctx.tmp / "serve.log"
    answered: list[float] = []
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        proc = stack.enter_context(started(argv, env, log))
        done = threading.Event()
        stack.callback(done.set)
        poller = threading.Thread(target=_first_answer, args=(sock, done, answered), daemon=True)
        poller.start()
        deadline = t0 + STEP_TIMEOUT
        while poller.is_alive() and time.perf_counter() < deadline and proc.poll() is None:
            poller.join(0.05)
        if not answered:
            raise BenchError(f"aemagent serve did not answer on {sock}: {tail(log)}")
    return answered[0] - t0


# ---- memory


def memory_rows(ctx: Context, plan: Plan) -> list[tuple[str, int, int]]:
    env = child_env(ctx.tmp, str(ctx.fresh_dir("s") / "a.sock"))
    emulator = start_emulator(ctx.stack, ctx.tmp, env)
    agent = start_agent(ctx.stack, ctx.tmp, env, log_name="memory.log")
    pid, sock = agent.pid, agent.sock
    credential = emulator["credentials"]["service"]
    time.sleep(1.0)  # at rest
    rows = [("idle, no profile", *memory(pid))]
    cli(env, "add", credential, "--name", "p0")
    time.sleep(1.0)
    rows.append(("1 profile, its first token fetched", *memory(pid)))
    for _ in range(plan.served):
        get_token(sock)
    rows.append((f"after {plan.served} `GET /v1/token`, a new connection each", *memory(pid)))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [
            pool.submit(cli, env, "add", credential, "--name", f"p{i}")
            for i in range(1, plan.profiles + 1)
        ]
        for job in jobs:
            job.result()
    n = plan.profiles + 1
    rows.append((f"{n} profiles (one credential under {n} names)", *memory(pid)))
    before = open_fds(pid)
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


def render(result: dict) -> str:
    plan = result["plan"]
    n = result["start"]["n"]

    def row(what: str, s: dict) -> list[str]:
        return [what, f"{ms(s['median'])} ({ms(s['min'])} to {ms(s['max'])})"]

    start_rows = [
        row("`aemagent start`: exec until it returned (shell lines printed)", result["start"]),
        row("↳ exec until the socket first answered `GET /v1/health`", result["answers"]),
        row("`aemagent serve` in the foreground: exec until the socket answered", result["serve"]),
        row("`aemagent stop`: exec until it returned (the agent gone)", result["stop"]),
    ]
    how_start = (
        f"Each of the {n} runs (after one warm-up) starts an agent with `aemagent start` on a"
        ' socket in a private temp dir, as `eval "$(aemagent start)"` does, then stops it with'
        " `aemagent stop`. `start` returns once its own `GET /v1/health` is answered (it polls"
        f" every 20 ms); a thread in the bench polls the socket every {POLL * 1e3:g} ms from the"
        " exec on, for the second row. `aemagent serve` is the daemon alone (what systemd and"
        " launchd run), timed the same way by the bench."
    )
    idle = result["memory"][0][1]
    memory_rows = [
        [what, mib(rss), mib(hwm), ratio(rss / idle), f"{(rss - idle) / 1024:+.1f} MiB"]
        for what, rss, hwm in result["memory"]
    ]
    how_memory = (
        "`VmRSS` (resident now) and `VmHWM` (peak) of one `aemagent serve` from"
        " `/proc/PID/status`, each after a second at rest. The first `aemagent add` loads the IMS"
        " client (httpx, ssl, pyjwt's signing) into the daemon; the extra profiles are the same"
        f" service credential added {plan['profiles']} more times under other names (`aemagent"
        f" add FILE --name pN`), each with its own token; the {plan['idle']} idle connections are"
        " opened and left silent (the daemon's cap is 1024)."
    )
    return "\n".join(
        [
            table(["what", f"median (min to max), {n} runs"], start_rows),
            "",
            how_start,
            "",
            table(
                ["daemon state", "VmRSS", "VmHWM (peak)", "x no profile", "+ no profile"],
                memory_rows,
            ),
            "",
            how_memory,
        ]
    )


def targets(_result: dict) -> list[Target]:
    return []  # figures to report, with no target
