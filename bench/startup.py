"""aem-token start-up: the whole process as users run it, against the interpreter's own floor.

The project is built into a wheel and installed by pip into a fresh venv (`python -m venv`, with
the pip that venv comes with), so `aem-token` is the script users run, with the bytecode pip
compiled, not the development checkout. hyperfine (`-N`: no shell) times it side by side with
the floor of any Python CLI (`python -c pass`, and `-I -S` without site), with `python -m`, with
the console-script wrapper that venv's pip writes, and with what users do without an agent: a
script that signs a JWT and exchanges it at the IMS emulator on every call. The daemon, the
emulator and the commands that need trio or pyjwt run from the development venv.

Then, in process: one `GET /v1/token` on a new connection against one JWT exchange (the signing
and the POST), and `python -X importtime` of the installed script: what the hot path loads.
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import shutil
import statistics
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from common import (
    BIN,
    DIE_WITH_PARENT,
    PY,
    STEP_TIMEOUT,
    BenchError,
    Context,
    Target,
    child_env,
    cli,
    get_token,
    ms,
    percentile,
    ratio,
    say,
    start_agent,
    start_emulator,
    stats,
    table,
)
from venvinstall import install_venv, wrapper_for_helper

TITLE = "aem-token start-up: the whole process, as pip installs it"
TARGET_RATIO = 1.30  # the target: aem-token ≤ 1.3 times python -c pass


@dataclass(frozen=True)
class Plan:
    runs: int  # runs per command, in all
    rounds: int  # ... split into this many rounds over all commands
    warmup: int  # per command and round
    served: int  # GET /v1/token requests in a row
    exchanges: int  # JWT exchanges in a row
    importtime: int  # python -X importtime runs


FULL = Plan(200, 20, 1, 2000, 50, 20)
QUICK = Plan(3, 1, 1, 100, 3, 2)

# What users without an agent run in every script: sign a JWT with the service credential's
# private key and exchange it at IMS, on every call.
NO_AGENT = '''\
"""Print an IMS access token: a JWT exchange on every call, as scripts without an agent do."""
import http.client
import json
import sys
import time
import urllib.parse

import jwt

with open(sys.argv[1]) as f:
    integ = json.load(f)["integration"]
ims = integ["imsEndpoint"]
account = integ["technicalAccount"]
now = int(time.time())
claims = {"exp": now + 300, "iat": now, "iss": integ["org"], "sub": integ["id"]}
claims["aud"] = f"{ims}/c/{account['clientId']}"
claims.update({f"{ims}/s/{scope}": True for scope in integ["metascopes"].split(",")})
assertion = jwt.encode(claims, integ["privateKey"], algorithm="RS256")
form = {"client_id": account["clientId"], "client_secret": account["clientSecret"]}
form["jwt_token"] = assertion
url = urllib.parse.urlsplit(ims)
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
conn.request(
    "POST",
    "/ims/exchange/jwt",
    urllib.parse.urlencode(form),
    {"Content-Type": "application/x-www-form-urlencoded"},
)
answer = conn.getresponse()
if answer.status != 200:
    sys.exit(f"IMS: HTTP {answer.status}")
print(json.loads(answer.read())["access_token"])
'''


def measure(ctx: Context) -> dict:
    plan = QUICK if ctx.quick else FULL
    env = child_env(ctx.tmp, str(ctx.fresh_dir("s") / "a.sock"))
    say("building the wheel and installing it into a fresh venv")
    install = install_venv(ctx.tmp, env)
    say("starting the IMS emulator and the agent")
    emulator = start_emulator(ctx.stack, ctx.tmp, env)
    agent = start_agent(ctx.stack, ctx.tmp, env)
    credential = Path(emulator["credentials"]["service"])
    cli(env, "add", str(credential))
    commands = command_list(ctx.tmp, install, credential)
    say(f"start-up: {plan.runs} runs of {len(commands)} commands")
    rows, method, shown = time_commands(plan, commands, env, ctx.tmp)
    say("imports of the installed aem-token (python -X importtime)")
    imports = hot_path_imports(plan, install, env)
    say(f"served: {plan.served} socket requests, {plan.exchanges} JWT exchanges")
    served = served_vs_exchange(plan, agent.sock, credential)
    return {
        "plan": plan.__dict__,
        "install": install,
        "rows": rows,
        "method": method,
        "command": shown,
        "imports": imports,
        "served": served,
    }


# ---- what is timed, from the installation users get (bench/venvinstall.py)


def command_list(tmp: Path, install: dict, credential: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) in report order; the first is the baseline."""
    py, token = install["python"], str(Path(install["bin"]) / "aem-token")
    no_agent = tmp / "no_agent.py"
    no_agent.write_text(NO_AGENT)
    commands = [
        ("python -c pass", [py, "-c", "pass"]),
        ("python -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
        ("aem-token", [token]),
        ("aem-token --format header", [token, "--format", "header"]),
        ("aem-token --format json", [token, "--format", "json"]),
    ]
    wrapper = wrapper_for_helper(install, tmp)
    if wrapper is not None:
        name = f"aem-token as a console-script wrapper (by pip {install['pip']})"
        commands.append((name, [str(wrapper)]))
    commands += [
        ("python -m aemagent.helper", [py, "-m", "aemagent.helper"]),
        ("no agent: sign a JWT and exchange it (pyjwt)", [PY, str(no_agent), str(credential)]),
        ('python -c "import trio"', [PY, "-c", "import trio"]),
        ("aemagent status", [str(BIN / "aemagent"), "status"]),
    ]
    return commands


# ---- timing whole processes


def time_commands(
    plan: Plan, commands: list[tuple[str, list[str]]], env: dict[str, str], tmp: Path
) -> tuple[list[dict], str, str]:
    """[{name, median, min, max, ..., rounds}]; the method; the command line, readable.

    hyperfine times one command's runs back to back, so a noisy neighbour that is busy for a
    second skews one command. The runs are split into rounds over all commands, and pooled.
    """
    for name, argv in commands:  # a failing command would time its error path
        done = subprocess.run(argv, env=env, capture_output=True, timeout=STEP_TIMEOUT, check=False)
        if done.returncode != 0 or (name.startswith(("aem-token", "no agent")) and not done.stdout):
            raise BenchError(f"{name} failed ({done.returncode}): {done.stderr.decode()[-300:]}")
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
            done = subprocess.run(
                argv,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,  # its warnings too: the rounds show the noise
                text=True,
                check=False,
                preexec_fn=DIE_WITH_PARENT,
            )
            if done.returncode != 0:
                raise BenchError(f"hyperfine failed: {done.stderr.strip()[-500:]}")
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
            **stats([t for r in rounds for t in r[i]]),
            "rounds": [statistics.median(r[i]) for r in rounds],
        }
        for i, (name, _) in enumerate(commands)
    ]
    if not hyperfine:
        method = "a subprocess.run loop (hyperfine NOT FOUND: this adds Python's fork/exec cost)"
        return rows, method, f"{plan.rounds} rounds of {runs} runs per command"
    version = subprocess.run(["hyperfine", "--version"], capture_output=True, text=True, check=True)
    shown = shlex.join(argv[:4]) + f" --runs {runs} --export-json OUT.json "
    shown += " ".join(shlex.quote(name) for name, _ in commands)
    if plan.rounds > 1:
        shown = f"# {plan.rounds} times; each command's times pooled\n{shown}"
    return rows, f"`{version.stdout.strip()}`", shown


_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


def importtime(argv: list[str], env: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """{module: (self µs, cumulative µs, depth)} of one run under `-X importtime`."""
    done = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
        check=False,
    )
    found = {}
    for line in done.stderr.splitlines():
        if m := _IMPORTTIME.match(line):
            found[m[4]] = (int(m[1]), int(m[2]), len(m[3]) // 2)
    return found


def hot_path_imports(plan: Plan, install: dict, env: dict[str, str]) -> dict:
    """What the installed aem-token imports beyond a bare `python -c pass`: medians of N runs."""
    py = install["python"]
    script = str(Path(install["bin"]) / "aem-token")
    base: set[str] = set()
    for _ in range(2):
        base |= set(importtime([py, "-c", "pass"], env))
    runs = [importtime([py, script], env) for _ in range(max(plan.importtime, 1))]
    order = [name for name in runs[0] if name not in base]
    modules = [
        {
            "name": name,
            "self": statistics.median(r[name][0] for r in runs if name in r),
            "cumulative": statistics.median(r[name][1] for r in runs if name in r),
            "depth": runs[0][name][2],
        }
        for name in order
    ]
    return {"runs": len(runs), "modules": modules}


# ---- in process: a served token vs. a JWT exchange on every run


def served_vs_exchange(plan: Plan, sock: str, credential: Path) -> dict:
    import jwt  # the bench's venv has it; only this section needs it

    for _ in range(20):
        get_token(sock)
    served = [get_token(sock) for _ in range(plan.served)]
    integ = json.loads(credential.read_text())["integration"]
    ims = integ["imsEndpoint"]
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


# ---- the report


def _find(result: dict, name: str) -> dict | None:
    return next((row for row in result["rows"] if row["name"] == name), None)


def render(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]
    install = result["install"]
    table_rows = []
    for i, row in enumerate(rows):
        name = (
            f"`{row['name']}`"
            if not row["name"].startswith(("no agent", "aem-token as"))
            else row["name"]
        )
        table_rows.append(
            [
                name + (" (baseline)" if i == 0 else ""),
                f"{ms(row['median'])} ({ms(row['min'])} to {ms(row['max'])})",
                ratio(row["median"] / base["median"]),
                "" if i == 0 else f"{(row['median'] - base['median']) * 1e3:+.1f} ms",
            ]
        )
    token = _find(result, "aem-token")
    assert token is not None
    per_round = zip(token["rounds"], base["rounds"], strict=True)
    spread = ", ".join(f"{(t - b) * 1e3:+.1f} ms" for t, b in per_round)
    plan = result["plan"]
    if install["installed"]:
        how = (
            f"`aem-token` here is the script pip {install['pip']} installed from the wheel"
            f" ({install['wheel']}, built with"
            + (" build isolation" if install["isolated"] else " the development venv's hatchling")
            + ") into a fresh `python -m venv`, its bytecode compiled by pip;"
            + (
                " an entry-point wrapper pip generated."
                if install["aem_token_is_wrapper"]
                else " a two-line script shipped in the wheel (`bin/aem-token`), not a wrapper"
                " pip generates."
            )
            + " `python` is that venv's interpreter."
        )
    else:
        how = (
            "**The install into a fresh venv failed** "
            f"({install['why']}): these are the development venv's scripts."
        )
    parts = [
        table(
            ["command", "median (min to max)", "x python -c pass", "+ python -c pass"], table_rows
        ),
        "",
        f"**aem-token: {ratio(token['median'] / base['median'])} the bare interpreter"
        f" ({(token['median'] - base['median']) * 1e3:+.1f} ms).** Round by round: {spread}."
        f" {plan['runs']} runs per command in {plan['rounds']} round"
        + "s" * (plan["rounds"] > 1)
        + f", after {plan['warmup']} warm-up run"
        + "s" * (plan["warmup"] > 1)
        + f" per command and round. {how} The console-script wrapper row is"
        " the text that pip wrote for the `aemagent` entry point in the same venv, pointed at"
        " the helper. The no-agent script, `import trio` and `aemagent status` run in the"
        " development venv (pyjwt and trio live there); the no-agent script reads the service"
        " credential, signs a JWT with pyjwt and POSTs it to the emulator over loopback (real IMS"
        f" adds a round trip across the internet). Timed with {result['method']}:",
        "",
        "```sh",
        result["command"],
        "```",
    ]
    imports = result["imports"]
    if imports["modules"]:
        mods = ", ".join(f"`{m['name']}` {m['self'] / 1e3:.2f}" for m in imports["modules"])
        total = sum(m["self"] for m in imports["modules"])
        parts += [
            "",
            (
                "What the installed `aem-token` imports beyond `python -c pass`, with each"
                " module's own import time in ms (`python -X importtime`, median of"
                f" {imports['runs']} runs): {mods}; {total / 1e3:.2f} ms in all, under"
                " importtime's own overhead."
            ),
        ]
    s = result["served"]
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
        served_rows.append(
            [what, ms(median), ms(percentile(sorted(s[key]), 0.99)), ratio(median / served)]
        )
    parts += [
        "",
        (
            "A served token against a JWT exchange, in one process, neither counting interpreter"
            " start-up or imports: a raw `AF_UNIX` socket making the request `aem-token` makes,"
            " against building, signing and POSTing the JWT as the no-agent script does."
        ),
        "",
        table(["what", "median", "p99", "x served"], served_rows),
    ]
    return "\n".join(parts)


def targets(result: dict) -> list[Target]:
    base = result["rows"][0]
    token = _find(result, "aem-token")
    assert token is not None
    x = token["median"] / base["median"]
    where = (
        "pip-installed" if result["install"]["installed"] else "development venv: install failed"
    )
    return [
        Target(
            f"aem-token ({where}) vs python -c pass, whole process",
            f"≤ x{TARGET_RATIO:.2f}",
            f"{ratio(x)} ({ms(token['median'])} vs {ms(base['median'])})",
            x <= TARGET_RATIO,
        )
    ]
