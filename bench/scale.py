"""Scale with profiles: 1, 100 and 1,000 profiles loaded from the config file.

For each size a fresh agent starts with `serve --config` on a file of N profiles, all backed by
the emulator's service credential file (`[profiles.pI] file = …`, each with its own host
`author-pI-eI.adobeaemcloud.com`). The emulator holds every token request DELAY seconds
(`--exchange-delay`, as real IMS is slow to answer) and counts how many it answers at once
(`GET /_emulator/stats`), which shows the agent's cap on concurrent IMS calls.

Measured per size: the time from the agent's start until the config file's profiles are all
loaded and until all have a token (seen in the agent's log as it writes it, so that polling the
agent does not slow it down), the daemon's RSS once all are fresh, when their next refreshes are
due, and the most exchanges in flight. Then a refresh storm: one request per profile, all at once,
each asking for more `min_valid` than its token has left, so that N exchanges are wanted at the
same moment and only the cap holds them back. Token latency at N is measured against the 1-profile
agent, which keeps running: blocks of requests alternate between the two agents so that noise on
this shared machine hits both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import urllib.parse
from pathlib import Path

from common import (
    Agent,
    BenchError,
    Context,
    Target,
    api,
    child_env,
    cpu_seconds,
    get_token,
    memory,
    mib,
    ms,
    pin,
    ratio,
    start_agent,
    start_emulator,
    stats,
    table,
    tail,
)
from flight import emulator_get, fire

TITLE = "Scale with profiles"
SIZES, QUICK_SIZES = (1, 100, 1000), (1, 10, 30)
DELAY, QUICK_DELAY = 0.05, 0.02  # seconds the emulator holds each exchange
LATENCY, QUICK_LATENCY = 3000, 100  # token requests per kind and agent
BLOCK, QUICK_BLOCK = 100, 25  # ... in alternating blocks of this many
CAP = 4  # agent.ims_concurrency: the default, written into the config file to be sure
LIFETIME = 24 * 3600  # the emulator's tokens, as IMS's
RSS_TARGET_BYTES = 80_000_000  # the target: 80 MB (76.3 MiB)
LATENCY_TARGET = 1.10
KEYS, QUICK_KEYS = 100, 5  # config profiles with an RSA key each (distinct_keys)


def host(i: int) -> str:
    return f"author-p{i}-e{i}.adobeaemcloud.com"


def write_config(path: Path, n: int, credential: str) -> Path:
    lines = ["[agent]", f"ims_concurrency = {CAP}", ""]
    for i in range(1, n + 1):
        lines += [f"[profiles.p{i}]", f"file = {json.dumps(credential)}"]
        lines += [f"hosts = [{json.dumps(host(i))}]", ""]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    return path


class LogWatch:
    """Follows an agent's log: when the config was loaded, how many tokens were fetched."""

    LOADED = re.compile(r" config .*: (\d+) profile\(s\)$")
    TOKEN = re.compile(r" profile (\S+): new token ")

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""
        self.loaded: int | None = None
        self.tokens: set[str] = set()
        self.errors: list[str] = []

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if m := self.LOADED.search(line):
                self.loaded = int(m[1])
            elif m := self.TOKEN.search(line):
                self.tokens.add(m[1])
            elif " ERROR " in line or (" WARNING profile " in line):  # failed fetches
                self.errors.append(line)


def load(ctx: Context, stack: contextlib.ExitStack, n: int, emu: dict) -> tuple[Agent, dict]:
    """Start an agent on a config file of n profiles; wait until all have a token."""
    directory = ctx.fresh_dir("s")
    config = write_config(directory / "config.toml", n, emu["credentials"]["service"])
    env = child_env(ctx.tmp, str(directory / "a.sock"))
    emulator_get(emu["url"], "/_emulator/stats", "DELETE")
    log = ctx.tmp / f"agent{n}.log"
    t0 = time.monotonic()
    agent = start_agent(stack, ctx.tmp, env, "--config", str(config), log_name=log.name)
    up = time.monotonic() - t0
    watch, loaded, fresh = LogWatch(log), None, None
    deadline = t0 + 60 + 0.25 * n
    probes: list[float] = []  # GET /v1/health while loading: does the socket stay responsive?
    next_probe = 0.0
    while fresh is None:
        watch.poll()
        now = time.monotonic() - t0
        if now >= next_probe:
            probes.append(get_token(agent.sock, HEALTH_REQUEST))
            next_probe = time.monotonic() - t0 + PROBE_INTERVAL
        if loaded is None and watch.loaded is not None:
            loaded = now
        if len(watch.tokens) >= n:
            fresh = now
        elif watch.errors:
            raise BenchError(f"{n} profiles: the agent logged: {watch.errors[0]}")
        elif agent.proc.poll() is not None:
            raise BenchError(f"the agent exited ({agent.proc.returncode}): {tail(log)}")
        elif time.monotonic() > deadline:
            raise BenchError(f"{n} profiles: only {len(watch.tokens)} tokens after {now:.0f} s")
        else:
            time.sleep(0.02)
    if loaded is None:  # "config …: N profile(s)" comes after the last add; tokens may be first
        while watch.loaded is None and time.monotonic() < deadline:
            time.sleep(0.02)
            watch.poll()
        loaded = time.monotonic() - t0
    rss, hwm = memory(agent.pid)
    cpu = cpu_seconds(agent.pid)
    seen = emulator_get(emu["url"], "/_emulator/stats")
    assert isinstance(seen, dict)
    _, listing = api(agent.sock, "GET", "/v1/profiles")
    profiles = listing["profiles"]
    states = sorted({p["state"] for p in profiles})
    if len(profiles) != n or states != ["valid"]:
        raise BenchError(f"{n} profiles: the agent lists {len(profiles)}, states {states}")
    return agent, {
        "n": n,
        "up": up,
        "loaded": loaded,
        "fresh": fresh,
        "rss": rss,
        "hwm": hwm,
        "cpu": cpu,
        "max_in_flight": seen["max_in_flight"],
        "exchanges": seen["exchanges"],
        "spread": spread([p["refresh_at"] for p in profiles], time.time()),
        "fresh_at": t0 + fresh,
        "probes": stats(probes),
    }


def spread(due: list[int], now: float) -> dict:
    """When the next refreshes are due: first and last (seconds from now), most in one minute."""
    due = sorted(due)
    most, j = 0, 0
    for i, t in enumerate(due):  # the most refreshes due within any 60 s window
        while t - due[j] >= 60:
            j += 1
        most = max(most, i - j + 1)
    return {"first": due[0] - now, "last": due[-1] - now, "most_per_minute": most}


HEALTH_REQUEST = b"GET /v1/health HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n\r\n"
PROBE_INTERVAL = 0.1


def token_request(query: str) -> bytes:
    return (
        f"GET /v1/token?{query} HTTP/1.1\r\nHost: aemagent\r\nAccept: text/plain\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def requests_for(n: int) -> dict[str, bytes]:
    """By name and by URL, for a profile in the middle of the N (the one profile at N = 1)."""
    i = max(1, n // 2)
    url = urllib.parse.quote(f"https://{host(i)}/content/dam.json", safe="")
    return {"name": token_request(f"profile=p{i}"), "url": token_request(f"url={url}")}


def latency(base: Agent, big: Agent, n: int, total: int, block: int) -> dict:
    """Alternating blocks on the 1-profile and the N-profile agent; every time, per side. Both
    agents are pinned to CPU 0 and this process to CPU 1 meanwhile: left to the scheduler, one
    agent may share the client's CPU and the other not, which alone made a side 20 % slower."""
    pinned = pin(base.pid, 0) and pin(big.pid, 0) and pin(0, 1)
    try:
        return _latency(base, big, n, total, block)
    finally:
        if pinned:
            for pid in (base.pid, big.pid, 0):
                pin(pid, None)


def _latency(base: Agent, big: Agent, n: int, total: int, block: int) -> dict:
    sides = {"base": (base, requests_for(1)), "big": (big, requests_for(n))}
    times: dict[str, dict[str, list[float]]] = {s: {"name": [], "url": []} for s in sides}
    plan = [(side, kind) for kind in ("name", "url") for side in ("base", "big")]
    for side, kind in plan:  # warm-up, and a check that every request is answered 200
        agent, requests = sides[side]
        for _ in range(20):
            get_token(agent.sock, requests[kind])
    for round_ in range(max(1, total // block)):
        for side, kind in plan if round_ % 2 == 0 else plan[::-1]:
            agent, requests = sides[side]
            times[side][kind] += [get_token(agent.sock, requests[kind]) for _ in range(block)]
    out = {}
    for kind in ("name", "url"):
        b, g = stats(times["base"][kind]), stats(times["big"][kind])
        out[kind] = {"base": b, "big": g, "ratio": g["median"] / b["median"]}
    return out


def storm(agent: Agent, n: int, emu: dict, delay: float, fresh_at: float) -> dict:
    """n requests at once, one per profile, each needing a new token: n exchanges wanted.

    Every token was fetched before `fresh_at` (monotonic), so 2.5 s later each has less than
    LIFETIME - 2 s left, while a new one still has more than that when it is served.
    """
    min_valid = LIFETIME - 2
    time.sleep(max(0.0, fresh_at + 2.5 - time.monotonic()))
    emulator_get(emu["url"], "/_emulator/stats", "DELETE")
    targets = [f"/v1/token?profile=p{i}&min_valid={min_valid}" for i in range(1, n + 1)]
    shots, released = fire(agent.sock, targets)
    wall = max(s.done for s in shots) - released
    seen = emulator_get(emu["url"], "/_emulator/stats")
    assert isinstance(seen, dict)
    ok = sum(1 for s in shots if s.status == 200 and not s.error)
    return {
        "requests": n,
        "ok": ok,
        "wall": wall,
        "ideal": n * delay / CAP,
        "max_in_flight": seen["max_in_flight"],
        "exchanges": seen["exchanges"],
    }


def distinct_keys(ctx: Context, emu: dict, n: int) -> dict:
    """n config profiles, each with an RSA key of its own: loading them is n key checks (each a
    long stretch of CPU, under the GIL). Does the socket keep answering meanwhile? The emulator
    knows one service key, so these exchanges fail (invalid signature, no retries): only the load
    is measured here."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory = ctx.fresh_dir("k")
    document = json.loads(Path(emu["credentials"]["service"]).read_text())
    for field in ("publicKey", "certificateExpirationDate"):  # the certificate fits one key only
        document["integration"].pop(field, None)
    lines = ["[agent]", f"ims_concurrency = {CAP}", ""]
    for i in range(n):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        document["integration"]["privateKey"] = pem.decode()
        path = directory / f"k{i}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(document, f)
        lines += [f"[profiles.k{i}]", f"file = {json.dumps(str(path))}", ""]
    config = directory / "config.toml"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines))
    env = child_env(ctx.tmp, str(directory / "a.sock"))
    with contextlib.ExitStack() as stack:
        log = ctx.tmp / "agent-keys.log"
        t0 = time.monotonic()
        agent = start_agent(stack, ctx.tmp, env, "--config", str(config), log_name=log.name)
        watch, probes = LogWatch(log), []
        deadline = t0 + 60 + 0.5 * n
        while watch.loaded is None:
            if time.monotonic() > deadline:
                raise BenchError(f"{n} distinct keys: not loaded after {deadline - t0:.0f} s")
            probes.append(get_token(agent.sock, HEALTH_REQUEST))
            time.sleep(PROBE_INTERVAL)
            watch.poll()
        loaded = time.monotonic() - t0
        cpu = cpu_seconds(agent.pid)
    return {"n": n, "loaded": loaded, "cpu": cpu, "probes": stats(probes)}


def measure(ctx: Context) -> dict:
    sizes = QUICK_SIZES if ctx.quick else SIZES
    delay = QUICK_DELAY if ctx.quick else DELAY
    total, block = (QUICK_LATENCY, QUICK_BLOCK) if ctx.quick else (LATENCY, BLOCK)
    env = child_env(ctx.tmp, str(ctx.tmp / "unused.sock"))
    emu = start_emulator(ctx.stack, ctx.tmp, env, "--exchange-delay", str(delay))
    base, first = load(ctx, ctx.stack, sizes[0], emu)
    rows = [first]  # no storm at 1 profile: one exchange cannot exceed any cap
    for n in sizes[1:]:
        with contextlib.ExitStack() as stack:  # this agent stops before the next one starts
            big, row = load(ctx, stack, n, emu)
            row["latency"] = latency(base, big, n, total, block)
            row["storm"] = storm(big, n, emu, delay, row["fresh_at"])
            rows.append(row)
    for row in rows:
        del row["fresh_at"]
    keys = distinct_keys(ctx, emu, QUICK_KEYS if ctx.quick else KEYS)
    return {
        "delay": delay,
        "cap": CAP,
        "requests": total,
        "block": block,
        "rows": rows,
        "keys": keys,
    }


def _minutes(seconds: float) -> str:
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"


def _storm_cells(r: dict) -> list[str]:
    st = r.get("storm")
    if st is None:
        return ["-", "-"]
    answered = f"{st['ok']} of {st['requests']} answered"
    return [
        f"{answered}; {st['exchanges']} exchanges, at most **{st['max_in_flight']}** at once",
        f"{st['wall']:.2f} s ({st['ideal']:.2f} s at the cap)",
    ]


def render(result: dict) -> str:
    rows = result["rows"]
    load_rows = [
        [
            str(r["n"]),
            f"{r['up']:.2f} s",
            f"{r['loaded']:.2f} s",
            f"{r['fresh']:.2f} s",
            f"{r['cpu']:.1f} s",
            mib(r["rss"]),
            mib(r["hwm"]),
            f"{ms(r['probes']['median'])} / {ms(r['probes']['max'])}",
        ]
        for r in rows
    ]
    cap_rows = [
        [
            str(r["n"]),
            f"{r['exchanges']}, at most **{r['max_in_flight']}** at once",
            *_storm_cells(r),
            f"{_minutes(r['spread']['first'])} to {_minutes(r['spread']['last'])}",
            str(r["spread"]["most_per_minute"]),
        ]
        for r in rows
    ]
    lat_rows = []
    for r in rows[1:]:
        for kind, what in (("name", "`?profile=pI`"), ("url", "`?url=https://author-pI-eI…`")):
            lat = r["latency"][kind]
            lat_rows.append(
                [
                    f"{r['n']} vs 1",
                    what,
                    f"{ms(lat['big']['median'])} / {ms(lat['big']['p99'])}",
                    f"{ms(lat['base']['median'])} / {ms(lat['base']['p99'])}",
                    f"**{ratio(lat['ratio'])}**",
                ]
            )
    load_head = ["profiles", "socket answers", "all loaded", "all have a token"]
    load_head += ["daemon CPU by then", "RSS, all fresh", "peak RSS"]
    load_head += ["`GET /v1/health` meanwhile, median / max"]
    cap_head = ["profiles", "exchanges at start", "refresh storm: one request per profile"]
    cap_head += ["storm wall time", "next refreshes due in", "most due in one minute"]
    lat_head = ["profiles", "token by", "median / p99 at N", "median / p99 at 1", "ratio"]
    how = (
        "A fresh agent per size: `aemagent serve --config` on a file of N profiles that all read"
        " the emulator's service credential file, each with its own host pattern. Times are from"
        " the agent's start to the moment the bench saw its log say so (`config …: N"
        ' profile(s)`, and one "new token" line per profile); meanwhile the bench only asks'
        f" for `GET /v1/health` every {PROBE_INTERVAL * 1e3:.0f} ms, to see that the socket keeps"
        " answering while the keys are read (each RSA key check costs cryptography about 40 ms"
        " of CPU, one at a time). The emulator holds every exchange"
        f" {result['delay'] * 1e3:.0f} ms and"
        " counts how many it is answering at once; the agent's cap is"
        f" `ims_concurrency = {result['cap']}`. The refresh storm waits until every token is a"
        " few seconds old, then sends one `GET /v1/token?profile=pI&min_valid=…` per profile, all"
        " at once, each asking for more than its token has left: every profile wants an exchange"
        " at the same moment and only the cap holds them back. Next refreshes: `refresh_at` of"
        " `GET /v1/profiles` once all are fresh (24 h tokens: refreshed with a quarter of the"
        " lifetime plus up to 5 % jitter left), and the most of them due within any 60 s."
        f" Latency: {result['requests']} requests per cell, each on a new connection, in blocks"
        f" of {result['block']} alternating between the N-profile agent and the 1-profile agent"
        " (kept running for this), by name and by URL of a profile in the middle of the N,"
        " with both agents pinned to CPU 0 and the client to CPU 1 (left to the scheduler, one"
        " agent may share the client's CPU and the other not: a 20 % difference of its own)."
    )
    keys = result["keys"]
    probes = keys["probes"]
    distinct = (
        f"**{keys['n']} profiles with an RSA key each** (keys generated by the bench; the"
        f" rows above share one credential file, which the agent parses once): all loaded"
        f" {keys['loaded']:.2f} s after the start, with {keys['cpu']:.1f} s of daemon CPU (its"
        " own start-up included; the rest is cryptography's key checks, some 40 ms a key);"
        f" `GET /v1/health` every {PROBE_INTERVAL * 1e3:.0f} ms"
        f" meanwhile: median {ms(probes['median'])}, max {ms(probes['max'])} ({probes['n']}"
        " requests). The agent parses one key at a time with a short pause after each, so a"
        " request waits for a key check or two, never for the whole load. (The emulator knows"
        " one service key: these"
        " profiles' exchanges fail, once each, and only the load is measured.)"
    )
    return "\n".join(
        [
            table(load_head, load_rows),
            "",
            distinct,
            "",
            table(cap_head, cap_rows),
            "",
            table(lat_head, lat_rows),
            "",
            how,
        ]
    )


def targets(result: dict) -> list[Target]:
    big = result["rows"][-1]
    most = max(big["max_in_flight"], big["storm"]["max_in_flight"])
    out = [
        Target(
            f"daemon RSS at {big['n']} profiles",
            f"≤ 80 MB ({mib(RSS_TARGET_BYTES / 1024)})",
            mib(big["rss"]),
            big["rss"] * 1024 <= RSS_TARGET_BYTES,
        ),
        Target(
            f"concurrent IMS calls, {big['n']} profiles (start and refresh storm)",
            f"≤ the cap ({result['cap']})",
            f"at most {most}",
            most <= result["cap"],
        ),
    ]
    for kind, what in (("name", "by name"), ("url", "by URL")):
        lat = big["latency"][kind]
        out.append(
            Target(
                f"token latency {what}, {big['n']} profiles vs 1 (median)",
                f"≤ {ratio(LATENCY_TARGET)}",
                f"{ratio(lat['ratio'])} ({ms(lat['big']['median'])} vs"
                f" {ms(lat['base']['median'])})",
                lat["ratio"] <= LATENCY_TARGET,
            )
        )
    return out
