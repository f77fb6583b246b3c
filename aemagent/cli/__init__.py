"""`aemagent`: start, stop and talk to the agent.

Management commands talk to the daemon over its socket with the same stdlib client as
`aem-token` (wire.py); only `serve`, `emulator` and `demo` import trio. Exit codes are
`aem-token`'s: 0 ok, 1 unexpected, 2 no agent, 3 no such profile, 4 no usable token, 64 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from typing import Any, NoReturn

from aemagent import __version__
from aemagent.errors import AemAgentError
from aemagent.paths import socket_path
from aemagent.wire import AgentUnreachable, Reply, WireError, quote, request

EXIT_OK, EXIT_FAIL, EXIT_NO_AGENT, EXIT_NO_PROFILE, EXIT_NO_TOKEN, EXIT_USAGE = 0, 1, 2, 3, 4, 64
_EXIT_BY_STATUS = {400: EXIT_USAGE, 404: EXIT_NO_PROFILE, 409: EXIT_NO_PROFILE, 503: EXIT_NO_TOKEN}
# A credential file is a few KiB; anything this big is a mistake (and the daemon refuses it).
_MAX_CREDENTIAL_BYTES = 1024 * 1024
# How long `start` waits for a new daemon's socket to serve, and `stop` for the old one to go.
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
# Requests that may wait for IMS (the daemon answers within ~20 s) get this read timeout.
_IMS_READ_TIMEOUT = 35.0
# A reload may run every profile's `command` (each with its own timeout, 30 s by default).
_RELOAD_READ_TIMEOUT = 120.0
# After this long without IMS's answer, `add` says it is waiting (on a terminal only).
_WAITING_NOTE_AFTER = 1.0


class CLIError(Exception):
    """A failure to report as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# ---- talking to the daemon


def call(
    args: argparse.Namespace,
    method: str,
    target: str,
    body: Any = None,
    *,
    read_timeout: float = 10.0,
) -> Any:
    """One API call; returns the decoded JSON answer or raises CLIError."""
    path = socket_path(args.socket)
    payload = None if body is None else json.dumps(body).encode()
    headers = [("Accept", "application/json")]
    if payload is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        reply = request(
            path, method, target, body=payload, headers=headers, read_timeout=read_timeout
        )
    except AgentUnreachable as exc:
        raise CLIError(f"{exc}; {exc.advice}", EXIT_NO_AGENT) from None
    except WireError as exc:
        raise CLIError(f"bad answer from the agent at {path}: {exc}") from None
    return _decode(reply)


def _decode(reply: Reply) -> Any:
    try:
        data = json.loads(reply.body) if reply.body else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if 200 <= reply.status < 300:
        if data is None:
            raise CLIError(f"the agent answered {reply.status} without JSON")
        return data
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        raise CLIError(data["message"], _EXIT_BY_STATUS.get(reply.status, EXIT_FAIL))
    raise CLIError(f"the agent answered HTTP {reply.status}; is it an older version?")


# ---- commands


def cmd_start(args: argparse.Namespace) -> int:
    from aemagent.cli.launch import LaunchError, agent_pid, spawn_daemon

    path = socket_path(args.socket)
    pid = agent_pid(path)
    running = pid is not None
    if pid is None:
        _check_config(args.config)  # here, as `serve` would say it, not via the daemon's log
        try:
            launched = spawn_daemon(
                path, log_level=args.log_level, config=args.config, timeout=_START_TIMEOUT
            )
        except LaunchError as exc:
            raise CLIError(str(exc), exc.code) from None
        except AemAgentError as exc:
            raise CLIError(str(exc)) from None
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
    return EXIT_OK


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
        raise CLIError("the socket path contains characters csh cannot quote", EXIT_USAGE)
    return f"'{text}'"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_config(path: str | None) -> Any:
    """The config file, parsed; a file that `serve` would refuse is a usage error (64)."""
    from aemagent.daemon.config import load_config

    try:
        return load_config(path, required=path is not None)
    except AemAgentError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from aemagent.core import logs

    config = _check_config(args.config)
    logs.configure(args.log_level or config.log_level or "info")
    from aemagent.daemon.server import DaemonSettings, run

    return run(DaemonSettings(socket_path=socket_path(args.socket), config=config))


def cmd_reload(args: argparse.Namespace) -> int:
    """`POST /v1/reload`, which says what loaded; SIGHUP for an agent older than that endpoint."""
    path = socket_path(args.socket)
    try:
        reply = request(
            path,
            "POST",
            "/v1/reload",
            body=b"{}",
            headers=[("Accept", "application/json"), ("Content-Type", "application/json")],
            read_timeout=_RELOAD_READ_TIMEOUT,
        )
    except AgentUnreachable as exc:
        raise CLIError(f"{exc}; {exc.advice}", EXIT_NO_AGENT) from None
    except WireError as exc:
        raise CLIError(f"bad answer from the agent at {path}: {exc}") from None
    if reply.status in (404, 405):  # an agent from before POST /v1/reload
        return _reload_by_signal(path)
    answer = _decode(reply)
    if not isinstance(answer, dict) or not isinstance(answer.get("profiles"), list):
        raise CLIError("the agent's answer to the reload is not understood")
    from aemagent.cli.launch import agent_pid

    print(reload_summary(answer, agent_pid(path)))
    return EXIT_OK


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

    from aemagent.cli.launch import agent_pid

    pid = agent_pid(path)
    if pid is None:
        raise CLIError(f"no agent answers on {path}; start it with `aemagent start`", EXIT_NO_AGENT)
    os.kill(pid, signal.SIGHUP)
    print(
        f"asked the agent (pid {pid}) to reload its config file; it is an older version that"
        " does not say how that went: see `aemagent status`"
    )
    return EXIT_OK


def cmd_service(args: argparse.Namespace) -> int:
    from aemagent.cli import service

    plan = service.plan_for(args.manager or service.default_manager())
    act = service.install if args.action == "install" else service.uninstall
    try:
        lines = act(plan, force=args.force)
    except AemAgentError as exc:
        raise CLIError(str(exc)) from None
    print("\n".join(lines))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    path = socket_path(args.socket)
    answer = call(args, "POST", "/v1/shutdown")
    pid = answer.get("pid") if isinstance(answer, dict) else None
    from aemagent.cli.launch import wait_until_gone

    if not wait_until_gone(path, _STOP_TIMEOUT):
        raise CLIError(f"the agent (pid {pid}) did not stop within {_STOP_TIMEOUT:g} s")
    print(f"stopped the agent (pid {pid})")
    return EXIT_OK


def cmd_add(args: argparse.Namespace) -> int:
    if args.save and args.file == "-":
        raise CLIError(
            "--save records a FILE's path; for stdin, write a `command` profile in the config file",
            EXIT_USAGE,
        )
    notes: list[str] = []
    credential = read_credential(args.file, notes)
    body: dict[str, Any] = {"credential": credential}
    if args.name:
        body["name"] = args.name
    if args.host:
        body["hosts"] = args.host
    if args.default:
        body["default"] = True
    if args.lifetime is not None:
        body["lifetime"] = args.lifetime
    try:
        profile = call(args, "POST", "/v1/profiles", body)
    except CLIError as exc:
        if exc.code != EXIT_USAGE:
            raise
        raise CLIError(f"cannot add {_what_was_read(args.file)}: {exc}", exc.code) from None
    name = profile["name"]
    what = f"{profile['kind']} credential, client id {profile.get('client_id')}"
    try:
        with _waiting_note("waiting for IMS…"):
            token = call(
                args, "GET", f"/v1/token?profile={quote(name)}", read_timeout=_IMS_READ_TIMEOUT
            )
    except CLIError as exc:
        if exc.code != EXIT_NO_TOKEN:
            raise
        raise CLIError(
            f"added profile {name} ({what}), but it has no token: {exc}", exc.code
        ) from None
    print(f"added profile {name} ({what}); token valid for {human_duration(token['expires_in'])}")
    for note in notes:  # only now: on failure, stderr has one line, the error
        print(f"aemagent: {note}", file=sys.stderr)
    if args.save:
        save_to_config(args, name)
    return EXIT_OK


@contextlib.contextmanager
def _waiting_note(note: str, after: float = _WAITING_NOTE_AFTER) -> Iterator[None]:
    """Say `note` on stderr if the block takes longer than `after`, when stderr is a terminal.

    Scripts (stderr not a terminal) see exactly the output they saw before.
    """
    if not sys.stderr.isatty():
        yield
        return
    import threading

    timer = threading.Timer(after, lambda: print(f"aemagent: {note}", file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()


def save_to_config(args: argparse.Namespace, name: str) -> None:
    from aemagent.daemon.config import ProfileSource, default_config_path, save_profile

    path = args.config or default_config_path()
    source = ProfileSource(
        name=name,
        file=os.path.abspath(args.file),
        hosts=tuple(h.lower() for h in args.host),
        default=args.default,
    )
    try:
        save_profile(path, source)
    except AemAgentError as exc:
        raise CLIError(f"added, but not saved: {exc}") from None
    print(f"saved profile {name} in {path} (the file's path, not its content)")


def _what_was_read(source: str) -> str:
    if source != "-":
        return source
    return "the pasted credential" if sys.stdin.isatty() else "the credential on standard input"


def read_credential(source: str, notes: list[str] | None = None) -> Any:
    """The credential from a file or stdin: a JSON object, or a bare string (a token).

    A warning about the file (readable by others) goes to `notes` if given, else to stderr.
    """
    if source == "-":
        if sys.stdin.isatty():
            data = read_from_terminal(sys.stdin.fileno())
            label = "the pasted text"
        else:
            data = sys.stdin.buffer.read(_MAX_CREDENTIAL_BYTES + 1)
            label = "standard input"
    else:
        try:
            with open(source, "rb") as f:
                data = f.read(_MAX_CREDENTIAL_BYTES + 1)
                mode = os.fstat(f.fileno()).st_mode
        except OSError as exc:
            raise CLIError(f"cannot read {source}: {exc.strerror}", EXIT_USAGE) from None
        if mode & 0o077:
            note = (
                f"warning: {source} is readable by other users (mode {mode & 0o777:o});"
                " once added, consider deleting it or `chmod 600` it"
            )
            if notes is None:
                print(f"aemagent: {note}", file=sys.stderr)
            else:
                notes.append(note)
        label = source
    if len(data) > _MAX_CREDENTIAL_BYTES:
        raise CLIError(
            f"{label} is larger than {_MAX_CREDENTIAL_BYTES} bytes: not a credential", EXIT_USAGE
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CLIError(f"{label} is not UTF-8 text: not a credential", EXIT_USAGE) from None
    stripped = text.strip()
    if not stripped:
        raise CLIError(f"{label} is empty", EXIT_USAGE)
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise CLIError(
                f"{label} is not valid JSON: {exc.msg.removesuffix(' at')} at line"
                f" {exc.lineno} column {exc.colno}",
                EXIT_USAGE,
            ) from None
    return stripped


def read_from_terminal(fd: int) -> bytes:
    """A credential pasted at the terminal, not echoed (it would stay on the screen).

    The terminal is put in non-canonical mode without echo, so a one-line JSON document longer
    than the tty's 4 KiB line buffer is not cut short. Input ends at Ctrl-D, or as soon as it is
    a complete JSON document or one line of a bare token. Ctrl-C still interrupts (ISIG stays
    on); the terminal's settings are restored on every path.
    """
    import termios

    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    data = bytearray()
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
        print(
            "aemagent: paste the credential (not shown); it is read once complete, or at Ctrl-D",
            file=sys.stderr,
            flush=True,
        )
        while len(data) <= _MAX_CREDENTIAL_BYTES:
            chunk = os.read(fd, 65536)
            end = chunk.find(b"\x04")  # Ctrl-D: the terminal does not turn it into EOF now
            if end >= 0:
                chunk = chunk[:end]
            for byte in chunk:
                if byte in (0x08, 0x7F):  # backspace: the line editing canonical mode would do
                    del data[-1:]
                else:
                    data.append(byte)
            if end >= 0 or not chunk or _complete(bytes(data)):
                break
    finally:
        # TCSAFLUSH: the rest of a paste (a trailing newline) must not reach the shell's prompt.
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
    if data.strip():  # said at once, so that nobody presses Ctrl-D for the shell to read
        print(f"aemagent: read {len(data)} bytes", file=sys.stderr, flush=True)
    return bytes(data)


def _complete(data: bytes) -> bool:
    """Whether pasted text is whole: a JSON document that parses, or one line of a token."""
    text = data.decode("utf-8", "replace").strip()
    if not text:
        return False
    if text.startswith(("{", "[")):
        try:
            json.loads(text)
        except (ValueError, RecursionError):  # incomplete, or bad: read on until Ctrl-D
            return False
        return True
    return data.rstrip(b" \t").endswith((b"\n", b"\r"))


def cmd_status(args: argparse.Namespace) -> int:
    answer = call(args, "GET", "/v1/profiles")
    profiles = answer.get("profiles", [])
    if args.json:
        print(json.dumps(answer, indent=2))
        return EXIT_OK
    if not profiles:
        print("no profiles loaded; add one with `aemagent add FILE`")
        return EXIT_OK
    print(format_table(profiles, time.time()))
    for line in warnings_for(profiles, time.time()):
        print(line)
    return EXIT_OK


def format_table(profiles: list[dict[str, Any]], now: float) -> str:
    rows = [("NAME", "KIND", "STATE", "EXPIRES IN", "NEXT REFRESH", "LAST ERROR")]
    for p in profiles:
        expires = p.get("expires_at")
        refresh = p.get("refresh_at")
        rows.append(
            (
                p["name"] + (" *" if p.get("default") else ""),
                p.get("kind", "?"),
                p.get("state", "?"),
                "-" if expires is None else human_until(expires, now),
                "-" if refresh is None else human_until(refresh, now, prefix="in "),
                (p.get("last_error") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5]
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def warnings_for(profiles: list[dict[str, Any]], now: float) -> list[str]:
    out = []
    for p in profiles:
        cert = p.get("certificate_expires_at")
        if isinstance(cert, int | float) and cert - now < 30 * 86400:
            when = "expired" if cert <= now else f"expires in {human_duration(cert - now)}"
            out.append(
                f"warning: {p['name']}: the certificate {when}; create new service credentials"
                " in the AEM Developer Console"
            )
        if p.get("kind") == "devtoken" and isinstance(p.get("expires_at"), int):
            left = p["expires_at"] - now
            if 0 < left < 2 * 3600:
                out.append(
                    f"warning: {p['name']}: the development token expires in {human_duration(left)}"
                )
    return out


def human_until(unix: float, now: float, prefix: str = "") -> str:
    left = unix - now
    if left <= 0:
        return "now" if prefix else "expired"
    return prefix + human_duration(left)


def human_duration(seconds: float) -> str:
    from aemagent.core.logs import describe_duration

    return describe_duration(seconds)


def cmd_forget(args: argparse.Namespace) -> int:
    if args.all == bool(args.names):
        raise CLIError("name the profiles to forget, or say --all (not both)", EXIT_USAGE)
    query = "?revoke=1" if args.revoke else ""
    timeout = _IMS_READ_TIMEOUT if args.revoke else 10.0
    if args.all:
        answer = call(args, "DELETE", f"/v1/profiles{query}", read_timeout=timeout)
        names = answer.get("forgotten", [])
        print(f"forgot {len(names)} profile(s)" + (f": {', '.join(names)}" if names else ""))
        for name, said in answer.get("revoked", {}).items():
            print(f"  {name}: {said}")
        return EXIT_OK
    code = EXIT_OK
    for name in args.names:
        try:
            answer = call(
                args, "DELETE", f"/v1/profiles/{quote(name)}{query}", read_timeout=timeout
            )
            said = answer.get("revoked", {}).get(name)
            print(f"forgot {name}" + (f"; {said}" if said else ""))
        except CLIError as exc:
            if exc.code == EXIT_NO_AGENT:
                raise
            print(f"aemagent: {exc}", file=sys.stderr)
            code = exc.code
    return code


def cmd_refresh(args: argparse.Namespace) -> int:
    profile = call(
        args, "POST", f"/v1/profiles/{quote(args.name)}/refresh", read_timeout=_IMS_READ_TIMEOUT
    )
    print(
        f"refreshed {profile['name']}; token valid for {human_duration(profile['expires_in'] or 0)}"
    )
    return EXIT_OK


def run_emulator(argv: list[str]) -> int:
    from aemagent.emulator import app as emulator

    parser = _Parser(
        prog="aemagent emulator", description="A local Adobe IMS stand-in for tests and demos."
    )
    emulator.add_arguments(parser)
    return emulator.run(parser.parse_args(argv))


def cmd_demo(args: argparse.Namespace) -> int:
    from aemagent.emulator import demo

    return demo.run(keep=args.keep)


# ---- arguments


def parse_duration(text: str) -> float:
    """'8h', '30m', '1d', '90s', '1h30m' or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for ch in text.strip().lower():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total += float(number) * units[ch]
            number = ""
        else:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 8h, 30m, 1d)")
    if number:
        total += float(number)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"not a positive duration: {text!r}")
    return total


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"aemagent: {message} (see `aemagent --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    socket_opt = _Parser(add_help=False)
    socket_opt.add_argument(
        "--socket",
        metavar="PATH",
        help="the agent's socket (default: $AEMAGENT_SOCK, else the per-user path)",
    )
    log_opt = _Parser(add_help=False)
    log_opt.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="daemon log level (default: the config file's, else info); never logs a secret",
    )
    log_opt.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AEMAGENT_CONFIG, else ~/.config/aemagent/config.toml)",
    )
    parser = _Parser(
        prog="aemagent", description="The ssh-agent of AEM: IMS access tokens from memory."
    )
    parser.add_argument("--version", action="version", version=f"aemagent {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    p = sub.add_parser(
        "start",
        parents=[socket_opt, log_opt],
        help="start the agent in the background (idempotent); prints shell lines for eval",
    )
    shells = p.add_mutually_exclusive_group()
    shells.add_argument(
        "--sh", dest="syntax", action="store_const", const="sh", help="sh/bash/zsh syntax (default)"
    )
    shells.add_argument(
        "--csh", dest="syntax", action="store_const", const="csh", help="csh/tcsh syntax"
    )
    shells.add_argument(
        "--fish", dest="syntax", action="store_const", const="fish", help="fish syntax"
    )
    p.set_defaults(func=cmd_start, syntax="sh")

    p = sub.add_parser(
        "serve",
        parents=[socket_opt, log_opt],
        help="run the agent in the foreground, logging to stderr",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", parents=[socket_opt], help="stop the agent")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "reload", parents=[socket_opt], help="re-read the config file and say what loaded"
    )
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser(
        "service",
        help="install or remove the systemd user units (Linux) or the launchd agent (macOS)",
    )
    p.add_argument("action", choices=("install", "uninstall"))
    managers = p.add_mutually_exclusive_group()
    managers.add_argument(
        "--systemd", dest="manager", action="store_const", const="systemd", help="systemd units"
    )
    managers.add_argument(
        "--launchd", dest="manager", action="store_const", const="launchd", help="launchd plist"
    )
    p.add_argument(
        "--force", action="store_true", help="overwrite or remove files that differ from ours"
    )
    p.set_defaults(func=cmd_service, manager=None)

    p = sub.add_parser("add", parents=[socket_opt], help="load a credential into the agent")
    p.add_argument(
        "file",
        nargs="?",
        default="-",
        metavar="FILE",
        help="credential JSON or a bare token; - or nothing for stdin",
    )
    p.add_argument(
        "--name",
        help="profile name (replaces a profile of that name); default derived from the credential",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="PATTERN",
        help="AEM host this profile serves, e.g. author-p1-e2.adobeaemcloud.com (repeatable)",
    )
    p.add_argument("--default", action="store_true", help="make this the default profile")
    p.add_argument(
        "--save",
        action="store_true",
        help="also record FILE's path (never its content) as a profile in the config file",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="the config file --save writes (default: $AEMAGENT_CONFIG, else the user config dir)",
    )
    p.add_argument(
        "--lifetime",
        type=parse_duration,
        metavar="DURATION",
        help="forget the credential after this long (e.g. 8h)",
    )
    p.set_defaults(func=cmd_add)

    for name in ("status", "list"):
        p = sub.add_parser(name, parents=[socket_opt], help="show the profiles (no secrets)")
        p.add_argument(
            "--json", action="store_true", help="machine-readable output; times in unix seconds"
        )
        p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "forget", parents=[socket_opt], help="drop credentials and their tokens from the agent"
    )
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="forget every profile")
    p.add_argument(
        "--revoke",
        action="store_true",
        help="also ask IMS to invalidate the current token (best effort; reported honestly)",
    )
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser(
        "refresh",
        parents=[socket_opt],
        help="fetch a new token now (also retries a failed credential)",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_refresh)

    # Listed here for --help; main() hands `emulator` to the emulator's own parser so that
    # the other commands do not import it (it needs trio, jwt and cryptography).
    p = sub.add_parser("emulator", help="run a local IMS emulator (plain HTTP, loopback only)")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the whole flow on this machine, no Adobe account needed")
    p.add_argument(
        "--keep", action="store_true", help="leave the demo's emulator and agent running"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # a new user's first try: the help, as `aemagent --help` gives it
        build_parser().print_help()
        return EXIT_OK
    if argv[:1] == ["emulator"]:
        return run_emulator(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"aemagent: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
