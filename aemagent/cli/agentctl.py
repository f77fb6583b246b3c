"""`aemagent start|serve|stop|reload|service|emulator|demo`: the agent's life, and the tools.

`start` and `stop` spawn and wait through aemagent.cli.launch; only `serve`, `emulator` and
`demo` import trio.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from aemagent import exits
from aemagent.cli.calls import call, decode, send
from aemagent.cli.launch import agent_pid, spawn_daemon, wait_until_gone
from aemagent.errors import AemAgentError, CommandError
from aemagent.paths import socket_path

# How long `start` waits for a new daemon's socket to serve, and `stop` for the old one to go.
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
# A reload may run every profile's `command` (each with its own timeout, 30 s by default).
_RELOAD_READ_TIMEOUT = 120.0


def cmd_start(args: argparse.Namespace) -> int:
    path = socket_path(args.socket)
    pid = agent_pid(path)
    running = pid is not None
    if pid is None:
        _check_config(args.config)  # here, as `serve` would say it, not via the daemon's log
        launched = spawn_daemon(
            path, log_level=args.log_level, config=args.config, timeout=_START_TIMEOUT
        )
        pid = launched.pid
        running = not launched.spawned
        if launched.spawned:
            print(f"aemagent: started the agent (pid {pid}) on {path}", file=sys.stderr)
        else:  # a racing `start` won the lock; ours stepped aside
            print(
                f"aemagent: the agent (pid {pid}) on {path} was started meanwhile by another"
                " process; using it",
                file=sys.stderr,
            )
    if running and (args.config is not None or args.log_level is not None):
        given = " and ".join(
            opt
            for opt, value in (("--config", args.config), ("--log-level", args.log_level))
            if value is not None
        )
        print(
            f"aemagent: warning: {given} ignored: the running agent (pid {pid}) keeps its"
            " settings; run `aemagent stop` first to start one with yours",
            file=sys.stderr,
        )
    sys.stdout.write(shell_lines(args.syntax, path, pid))
    return exits.OK


def shell_lines(syntax: str, path: str, pid: int) -> str:
    if syntax == "csh":
        return f"setenv AEMAGENT_SOCK {_csh_quote(path)};\nsetenv AEMAGENT_PID {pid};\n"
    if syntax == "fish":
        return f"set -gx AEMAGENT_SOCK {_fish_quote(path)};\nset -gx AEMAGENT_PID {pid};\n"
    return (
        f"AEMAGENT_SOCK={shlex.quote(path)}; export AEMAGENT_SOCK;\n"
        f"AEMAGENT_PID={pid}; export AEMAGENT_PID;\n"
    )


def _csh_quote(text: str) -> str:
    if "'" in text or "!" in text or "\n" in text:
        raise CommandError("the socket path contains characters csh cannot quote", exits.USAGE)
    return f"'{text}'"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_config(path: str | None) -> Any:
    """The config file, parsed; a file that `serve` would refuse is a usage error (64)."""
    from aemagent.daemon.config import load_config

    try:
        return load_config(path, required=path is not None)
    except AemAgentError as exc:
        raise CommandError(str(exc), exits.USAGE) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from aemagent.core import logs

    config = _check_config(args.config)
    logs.configure(args.log_level or config.log_level or "info")
    from aemagent.daemon.server import DaemonSettings, run

    return run(DaemonSettings(socket_path=socket_path(args.socket), config=config))


def cmd_stop(args: argparse.Namespace) -> int:
    path = socket_path(args.socket)
    answer = call(args, "POST", "/v1/shutdown")
    pid = answer.get("pid") if isinstance(answer, dict) else None
    if not wait_until_gone(path, _STOP_TIMEOUT):
        raise CommandError(f"the agent (pid {pid}) did not stop within {_STOP_TIMEOUT:g} s")
    print(f"stopped the agent (pid {pid})")
    return exits.OK


def cmd_reload(args: argparse.Namespace) -> int:
    """`POST /v1/reload`, which says what loaded; SIGHUP for an agent older than that endpoint."""
    path = socket_path(args.socket)
    reply = send(args, "POST", "/v1/reload", {}, read_timeout=_RELOAD_READ_TIMEOUT)
    if reply.status in (404, 405):  # an agent from before POST /v1/reload
        return _reload_by_signal(path)
    answer = decode(reply)
    if not isinstance(answer, dict) or not isinstance(answer.get("profiles"), list):
        raise CommandError("the agent's answer to the reload is not understood")
    print(reload_summary(answer, agent_pid(path)))
    return exits.OK


def reload_summary(answer: dict[str, Any], pid: int | None = None) -> str:
    """'the agent (pid 7) reloaded its config file: 2 profiles (a, b); not loaded: c: why'."""
    names = [str(n) for n in answer.get("profiles", [])]
    unloaded = answer.get("unloaded") or {}
    who = "the agent" if pid is None else f"the agent (pid {pid})"
    line = f"{who} reloaded its config file: {len(names)} profile{'' if len(names) == 1 else 's'}"
    if names:
        line += f" ({', '.join(names)})"
    if isinstance(unloaded, dict) and unloaded:
        why = "; ".join(f"{name}: {reason}" for name, reason in unloaded.items())
        line += f"; not loaded: {why}"
    return line


def _reload_by_signal(path: str) -> int:
    import signal

    pid = agent_pid(path)
    if pid is None:
        raise CommandError(
            f"no agent answers on {path}; start it with `aemagent start`", exits.NO_AGENT
        )
    os.kill(pid, signal.SIGHUP)
    print(
        f"asked the agent (pid {pid}) to reload its config file; it is an older version that"
        " does not say how that went: see `aemagent status`"
    )
    return exits.OK


def cmd_service(args: argparse.Namespace) -> int:
    from aemagent.cli import service

    plan = service.plan_for(args.manager or service.default_manager())
    act = service.install if args.action == "install" else service.uninstall
    lines = act(plan, force=args.force)  # its errors are exit 1
    print("\n".join(lines))
    return exits.OK


def run_emulator(argv: list[str]) -> int:
    from aemagent.cli.parser import Parser
    from aemagent.emulator import app as emulator

    parser = Parser(
        prog="aemagent emulator", description="A local Adobe IMS stand-in for tests and demos."
    )
    emulator.add_arguments(parser)
    return emulator.run(parser.parse_args(argv))


def cmd_demo(args: argparse.Namespace) -> int:
    from aemagent.emulator import demo

    return demo.run(keep=args.keep)
