"""Single flight: many concurrent requests that all need a new token cost exactly one IMS exchange.

Two cases, each with REQUESTS requests fired at once (threads behind a barrier, each
on its own connection, `GET /v1/token` with `Accept: text/plain`):

1. a profile just added (`POST /v1/profiles`), whose first token is still being fetched;
2. a profile with a valid token, asked for more `min_valid` than that token has left (but less
   than a fresh one has), so the token must be replaced before any request is answered.

The emulator holds every exchange DELAY seconds (`--exchange-delay`), long enough for all the
requests to be in the agent before IMS answers; the section checks that they were (the last one
sent before the first answer came back) rather than assuming it. Exchanges are counted from the
emulator's request log, cleared before each case.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (
    STEP_TIMEOUT,
    BenchError,
    Context,
    Target,
    api,
    child_env,
    ms,
    start_agent,
    start_emulator,
    stats,
    table,
)

TITLE = "Single flight: 500 concurrent requests, one IMS exchange"
REQUESTS, QUICK_REQUESTS = 500, 100
DELAY, QUICK_DELAY = 1.0, 0.5  # seconds the emulator holds each exchange
LIFETIME = 3600  # seconds: the emulator's tokens
PROFILE = "flight"


@dataclass
class Shot:
    sent: float = 0.0  # perf_counter when the request was written
    done: float = 0.0  # ... and when the whole answer was read
    status: int = 0
    token: bytes = b""
    error: str = ""


def fire(
    sock_path: str, targets: list[str], before: Callable[[], None] | None = None
) -> tuple[list[Shot], float]:
    """One request per target, all at once, each on its own connection; (shots, release time).

    `before`, if given, is called once every thread is ready, just before they are released.
    """
    shots = [Shot() for _ in targets]
    gate = threading.Barrier(len(targets) + 1)

    def one(shot: Shot, target: str) -> None:
        request = (
            f"GET {target} HTTP/1.1\r\nHost: aemagent\r\nAccept: text/plain\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            gate.wait()
        except threading.BrokenBarrierError:  # the caller failed before the release
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(STEP_TIMEOUT)
                s.connect(sock_path)
                s.sendall(request)
                shot.sent = time.perf_counter()
                data = bytearray()
                while chunk := s.recv(65536):
                    data += chunk
            shot.done = time.perf_counter()
            head, _, body = bytes(data).partition(b"\r\n\r\n")
            shot.status = int(head.split(b" ", 2)[1])
            shot.token = body
        except (OSError, ValueError, IndexError) as exc:
            shot.done = time.perf_counter()
            shot.error = f"{type(exc).__name__}: {exc}"

    threads = [
        threading.Thread(target=one, args=(shot, target), daemon=True)
        for shot, target in zip(shots, targets, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        if before is not None:
            before()
    except BaseException:
        gate.abort()
        raise
    released = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join(STEP_TIMEOUT * 2)
    if any(t.is_alive() for t in threads):
        raise BenchError("some requests never finished")
    return shots, released


def emulator_get(url: str, path: str, method: str = "GET") -> object:
    """One request to the emulator's test hooks; its JSON answer."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=STEP_TIMEOUT)
    try:
        conn.request(method, path)
        answer = conn.getresponse()
        body = answer.read()
    finally:
        conn.close()
    if answer.status != 200:
        raise BenchError(f"emulator {method} {path}: HTTP {answer.status}")
    return json.loads(body)


def case(
    name: str,
    sock: str,
    emu: dict,
    target: str,
    *,
    n: int,
    before: Callable[[], None] | None = None,
) -> dict:
    """n concurrent requests for `target`; what they got and how many exchanges they cost."""
    emulator_get(emu["url"], "/_emulator/requests", "DELETE")
    shots, released = fire(sock, [target] * n, before)
    seen = emulator_get(emu["url"], "/_emulator/requests")
    assert isinstance(seen, list)
    ok = [s for s in shots if s.status == 200 and not s.error]
    latencies = [s.done - released for s in shots if not s.error]
    if not latencies:
        raise BenchError(f"{name}: no request was answered: {shots[0].error}")
    answered = [s.done for s in ok] or [s.done for s in shots]
    return {
        "case": name,
        "requests": n,
        "ok": len(ok),
        "errors": sorted({s.error or f"HTTP {s.status}" for s in shots if s not in ok})[:3],
        "tokens": len({s.token for s in ok}),
        "token": next(iter({s.token for s in ok}), b"").decode(errors="replace"),
        "exchanges": sum(1 for r in seen if r["endpoint"] in ("jwt", "token")),
        "wall": max(s.done for s in shots) - released,
        "last_sent": max(s.sent for s in shots if s.sent) - released,
        "first_answer": min(answered) - released,
        "latency": stats(latencies),
    }


def measure(ctx: Context) -> dict:
    n = QUICK_REQUESTS if ctx.quick else REQUESTS
    delay = QUICK_DELAY if ctx.quick else DELAY
    sock = str(ctx.tmp / "a.sock")
    env = child_env(ctx.tmp, sock)
    emu = start_emulator(
        ctx.stack,
        ctx.tmp,
        env,
        "--exchange-delay",
        str(delay),
        "--token-lifetime",
        str(LIFETIME),
    )
    start_agent(ctx.stack, ctx.tmp, env)
    credential = json.loads(Path(emu["credentials"]["service"]).read_text())

    # 1. A profile just added: no token yet; its first exchange is in the air.
    def add() -> None:
        status, body = api(
            sock, "POST", "/v1/profiles", {"credential": credential, "name": PROFILE}
        )
        if status != 201:
            raise BenchError(f"POST /v1/profiles: {status} {body}")

    cold = case(
        "new profile, no token yet", sock, emu, f"/v1/token?profile={PROFILE}", n=n, before=add
    )

    # 2. A valid token with less left than asked for: min_valid = what a fresh token will still
    # have when the requests are answered (its lifetime less the exchange and a margin), which
    # the current token no longer has once it is a few seconds old.
    min_valid = LIFETIME - delay - 1.0
    deadline = time.monotonic() + STEP_TIMEOUT
    while True:
        _, info = api(sock, "GET", f"/v1/profiles/{PROFILE}")
        if info.get("expires_in") is not None and info["expires_in"] < min_valid - 1:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"the token did not age: {info}")
        time.sleep(0.2)
    left = info["expires_in"]
    target = f"/v1/token?profile={PROFILE}&min_valid={min_valid:g}"
    warm = case(f"min_valid {min_valid:g} s, token has {left} s", sock, emu, target, n=n)
    warm["replaced"] = warm["token"] != cold["token"]
    for result in (cold, warm):
        result.pop("token")
    return {"requests": n, "delay": delay, "lifetime": LIFETIME, "cases": [cold, warm]}


def render(result: dict) -> str:
    rows = []
    for c in result["cases"]:
        lat = c["latency"]
        rows.append(
            [
                c["case"],
                f"{c['ok']} of {c['requests']}",
                str(c["tokens"]),
                f"**{c['exchanges']}**",
                ms(c["last_sent"]),
                ms(c["first_answer"]),
                ms(c["wall"]),
                f"{ms(lat['median'])} / {ms(lat['p99'])}",
            ]
        )
    head = ["case", "answered 200", "distinct tokens", "IMS exchanges", "last request sent"]
    head += ["first answer", "last answer", "latency median / p99"]
    errors = [f"{c['case']}: {', '.join(c['errors'])}" for c in result["cases"] if c["errors"]]
    replaced = " (and it did get a new token)" if result["cases"][1].get("replaced") else ""
    how = (
        f"{result['requests']} threads released by one barrier, each on its own connection, each"
        " sending `GET /v1/token?profile=flight` with `Accept: text/plain`. The emulator holds"
        f" every exchange {result['delay']:g} s (`--exchange-delay`) and issues"
        f" {result['lifetime']} s tokens, so the requests pile up while the one exchange is in"
        ' the air; "last request sent" before "first answer" shows that they all did. Times are'
        " from the release of the barrier, so they include the exchange. IMS exchanges are"
        " counted in the emulator's request log, cleared before each case. Case 1 adds the"
        " profile (`POST /v1/profiles`, which answers before its first exchange is done) just"
        " before the release; case 2 asks (`&min_valid=…`) for more than the current token has"
        f" left but less than a fresh one will have{replaced}."
    )
    parts = [table(head, rows), "", how]
    if errors:
        parts += ["", f"Errors: {'; '.join(errors)}"]
    return "\n".join(parts)


def targets(result: dict) -> list[Target]:
    out = []
    for c in result["cases"]:
        met = (
            c["exchanges"] == 1
            and c["ok"] == c["requests"]
            and c["tokens"] == 1
            and c["last_sent"] < c["first_answer"]
        )
        out.append(
            Target(
                f"single flight, {c['case'].split(',')[0]}: {c['requests']} concurrent requests",
                "1 IMS exchange, all answered",
                f"{c['exchanges']} exchange(s), {c['ok']} of {c['requests']} answered 200,"
                f" {c['tokens']} distinct token(s)",
                met,
            )
        )
    return out
