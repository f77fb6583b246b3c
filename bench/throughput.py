"""Daemon throughput and latency over the Unix socket, against a minimal trio server."""

from __future__ import annotations

import os
import select
import subprocess
import time

from common import (
    PY,
    BenchError,
    Context,
    Target,
    child_env,
    cli,
    cpu_seconds,
    ms,
    pin,
    ratio,
    start_agent,
    start_emulator,
    started,
    table,
)
from loadgen import run_load

TITLE = "Daemon throughput and latency (`GET /v1/token`, text/plain)"
CLIENTS = (1, 16, 64, 256)
MODES = ("close", "keepalive")
# What aem-token sends (aemagent/wire.py), and the same without the close for keep-alive.
REQUESTS = {
    "close": "GET /v1/token HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n"
    "Accept: text/plain\r\n\r\n",
    "keepalive": "GET /v1/token HTTP/1.1\r\nHost: aemagent\r\nAccept: text/plain\r\n\r\n",
}
TARGET_CLIENTS = 64
# Since the HTTP server went back to h11 (docs/DESIGN.md, httpserver): 2,000 requests/s with a
# new connection each and a p99 under 50 ms; with keep-alive, twice that many.
TARGETS = {"close": 2000, "keepalive": 4000}
TARGET_P99 = 0.050


def start_reference(ctx: Context, env: dict[str, str]) -> int:
    sock = str(ctx.tmp / "ref.sock")
    argv = [PY, os.path.join(os.path.dirname(__file__), "reference_server.py"), sock]
    proc = ctx.stack.enter_context(
        started(argv, env, ctx.tmp / "reference.log", stdout=subprocess.PIPE)
    )
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready or proc.stdout.readline().strip() != b"ready":
        raise BenchError("the reference server did not start")
    return proc.pid


def load(sock: str, pid: int, clients: int, mode: str, *, seconds: float, pinned: bool) -> dict:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    result = run_load(
        sock,
        clients,
        mode=mode,
        duration=seconds,
        warmup=0.5 if seconds >= 1 else 0.1,
        request=REQUESTS[mode],
        cpu=1 if pinned else None,
    )
    result["server_cpu"] = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
    if result["requests"] == 0:
        raise BenchError(f"no request succeeded ({mode}, {clients} clients): {result}")
    return result


def measure(ctx: Context) -> dict:
    env = child_env(ctx.tmp, str(ctx.tmp / "a.sock"))
    emulator = start_emulator(ctx.stack, ctx.tmp, env)
    agent = start_agent(ctx.stack, ctx.tmp, env)
    cli(env, "add", emulator["credentials"]["service"])
    reference = start_reference(ctx, env)
    pinned = pin(agent.pid, 0) and pin(reference, 0)
    seconds = 0.5 if ctx.quick else 5.0
    rows = []
    for mode in MODES:
        for clients in CLIENTS:
            # Interleaved, so that a noisy neighbour hits both sides of each ratio.
            ours = load(agent.sock, agent.pid, clients, mode, seconds=seconds, pinned=pinned)
            ref_sock = str(ctx.tmp / "ref.sock")
            ref = load(ref_sock, reference, clients, mode, seconds=seconds, pinned=pinned)
            rows.append({"mode": mode, "clients": clients, "agent": ours, "reference": ref})
    generator = rows[0]["agent"]["generator"]
    return {"rows": rows, "pinned": pinned, "seconds": seconds, "generator": generator}


def render(r: dict) -> str:
    lines = []
    for row in r["rows"]:
        a, ref = row["agent"], row["reference"]
        lines.append(
            [
                "a new connection each" if row["mode"] == "close" else "keep-alive",
                str(row["clients"]),
                f"{a['rps']:,.0f}",
                ms(a["p50_ms"] / 1e3),
                ms(a["p99_ms"] / 1e3),
                f"{a['server_cpu']:.0%}",
                str(a["errors"]),
                f"{ref['rps']:,.0f}",
                ratio(a["rps"] / ref["rps"]),
            ]
        )
    head = ["requests", "clients", "requests/s", "p50", "p99", "daemon CPU", "errors"]
    head += ["reference req/s", "x reference"]
    pinning = (
        "the daemon (and the reference server) pinned to CPU 0 and the load generator to CPU 1"
        if r["pinned"]
        else "nothing pinned (one CPU)"
    )
    return "\n".join(
        [
            table(head, lines),
            "",
            (
                f"{r['seconds']:g} s per row after a warm-up, {pinning}; load from"
                f" {r['generator']}, each client making requests back to back:"
                " with `a new connection each` every request connects, sends what `aem-token`"
                " sends, reads the answer and closes; with `keep-alive` each client keeps one"
                " connection. *Reference* is bench/reference_server.py, a minimal trio + h11"
                " server answering a fixed token with no routing, agent or checks, loaded the"
                " same way right after each row: `x reference` is how the agent compares with"
                " trio's own floor on this machine."
            ),
        ]
    )


def targets(r: dict) -> list[Target]:
    out = []
    for row in r["rows"]:
        if row["clients"] != TARGET_CLIENTS:
            continue
        a, mode = row["agent"], row["mode"]
        want = TARGETS[mode]
        what = "a new connection each" if mode == "close" else "keep-alive"
        out.append(
            Target(
                f"requests/s at {TARGET_CLIENTS} clients, {what}",
                f"≥ {want:,}",
                f"{a['rps']:,.0f} ({ratio(a['rps'] / want)} the target)",
                a["rps"] >= want and a["errors"] == 0,
            )
        )
        if mode == "close":
            out.append(
                Target(
                    f"p99 at {TARGET_CLIENTS} clients, {what}",
                    f"≤ {ms(TARGET_P99)}",
                    ms(a["p99_ms"] / 1e3),
                    a["p99_ms"] / 1e3 <= TARGET_P99,
                )
            )
    return out
