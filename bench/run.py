"""Benchmarks: every figure that matters, side by side with its baseline, against its target.

    python bench/run.py [--quick] [--only SECTION ...] [--write docs/BENCHMARKS.md]

Each section starts what it needs (the IMS emulator, an agent on a private socket, credentials)
in a fresh temp dir and stops it again; see bench/common.py. Times are medians with min to max,
and every target is checked as a ratio to a baseline measured in the same run, because these
machines are shared and noisy: compare ratios, not absolute numbers across runs. Benchmarks
report; they never fail on timing. `--quick` is a smoke run (`pytest -m bench` runs it, so the bench
cannot rot): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchError, Context, Target, machine, say, table

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# In report order; each module has TITLE, measure(ctx) -> dict, render(dict) -> str and
# targets(dict) -> list[Target].
SECTIONS = ["startup", "throughput", "flight", "scale", "idle", "daemonstart"]


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def report(results: dict, info: dict) -> str:
    m = info["machine"]
    parts = [
        f"Measured {info['date']} on {m['cpus']} CPUs ({m['cpu']}), {m['os']}, Python "
        f"{m['python']}; load average {m['load']} at the start; {info['minutes']:.1f} minutes."
        + (" **--quick run: too few iterations to quote.**" if info["quick"] else ""),
        "",
        f"Command: `{info['command']}`",
    ]
    targets: list[Target] = []
    sections = []
    for name, result in results.items():
        module = importlib.import_module(name)
        targets += module.targets(result)
        sections += ["", f"### {module.TITLE}", "", module.render(result)]
    if targets:
        met = sum(t.met for t in targets)
        parts += ["", f"### Targets: {met} of {len(targets)} met", ""]
        rows = [[t.what, t.target, t.measured, "met" if t.met else "**NOT met**"] for t in targets]
        parts.append(table(["target", "wanted", "measured in this run", ""], rows))
    return "\n".join(parts + sections)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations: a smoke run")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION", help=", ".join(SECTIONS)
    )
    parser.add_argument("--write", metavar="FILE", type=Path, help="update FILE's results block")
    args = parser.parse_args(argv)
    raise_fd_limit(4096)  # before any agent starts: it inherits the limit
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = shlex.join(["python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    info = {"machine": machine(), "quick": args.quick, "command": command}
    started = time.monotonic()
    results: dict[str, dict] = {}
    try:
        for name in args.only or SECTIONS:
            module = importlib.import_module(name)
            say(f"{name}: {module.TITLE}")
            with contextlib.ExitStack() as stack:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aemb-")))
                results[name] = module.measure(Context(tmp, stack, args.quick))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.SubprocessError as exc:  # failed or hung; the tool said why on stderr
        print(f"bench: error: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info["minutes"] = (time.monotonic() - started) / 60
    text = report(results, info)
    print(text)
    if args.write:
        write_report(args.write, text)
        say(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
