"""The `aemagent` command line: one function per subcommand adds its arguments.

Each subcommand names its command function as `module:function` in aemagent.cli; main() imports
only that module, so `aemagent status` loads none of the code of `start` or `add`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from aemagent import __version__, exits


class Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit 64."""

    def error(self, message: str) -> NoReturn:
        self.exit(exits.USAGE, f"aemagent: {message} (see `aemagent --help`)\n")


if TYPE_CHECKING:
    from typing import TypeAlias

    _Sub: TypeAlias = "argparse._SubParsersAction[Parser]"


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


class Options:
    """The option groups several subcommands share, built once per parser."""

    def __init__(self) -> None:
        self.socket = _socket_option()
        self.log = _log_options()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `command` (a name in COMMANDS) only that subcommand's.

    main() builds only the subcommand it runs: argparse's work grows with every subparser, and
    `aemagent start` runs in every new shell. --help and an unknown command get them all.
    """
    options = Options()
    parser = Parser(
        prog="aemagent", description="The ssh-agent of AEM: IMS access tokens from memory."
    )
    parser.add_argument("--version", action="version", version=f"aemagent {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    if command in COMMANDS:
        COMMANDS[command](sub, options, command)
    else:
        for name, add in COMMANDS.items():
            add(sub, options, name)
    return parser


def _socket_option() -> Parser:
    parent = Parser(add_help=False)
    parent.add_argument(
        "--socket",
        metavar="PATH",
        help="the agent's socket (default: $AEMAGENT_SOCK, else the per-user path)",
    )
    return parent


def _log_options() -> Parser:
    parent = Parser(add_help=False)
    parent.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="daemon log level (default: the config file's, else info); never logs a secret",
    )
    parent.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AEMAGENT_CONFIG, else ~/.config/aemagent/config.toml)",
    )
    return parent


def _add_start(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(
        name,
        parents=[options.socket, options.log],
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
    p.set_defaults(command_func="agentctl:cmd_start", syntax="sh")


def _add_serve(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(
        name,
        parents=[options.socket, options.log],
        help="run the agent in the foreground, logging to stderr",
    )
    p.set_defaults(command_func="agentctl:cmd_serve")


def _add_stop(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(name, parents=[options.socket], help="stop the agent")
    p.set_defaults(command_func="agentctl:cmd_stop")


def _add_reload(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(
        name, parents=[options.socket], help="re-read the config file and say what loaded"
    )
    p.set_defaults(command_func="agentctl:cmd_reload")


def _add_service(sub: _Sub, _options: Options, name: str) -> None:
    p = sub.add_parser(
        name,
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
    p.set_defaults(command_func="agentctl:cmd_service", manager=None)


def _add_add(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(name, parents=[options.socket], help="load a credential into the agent")
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
    p.set_defaults(command_func="profiles:cmd_add")


def _add_status(sub: _Sub, options: Options, name: str) -> None:
    # `status` and `list` are one command under two names.
    p = sub.add_parser(name, parents=[options.socket], help="show the profiles (no secrets)")
    p.add_argument(
        "--json", action="store_true", help="machine-readable output; times in unix seconds"
    )
    p.set_defaults(command_func="status:cmd_status")


def _add_forget(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(
        name, parents=[options.socket], help="drop credentials and their tokens from the agent"
    )
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="forget every profile")
    p.add_argument(
        "--revoke",
        action="store_true",
        help="also ask IMS to invalidate the current token (best effort; reported honestly)",
    )
    p.set_defaults(command_func="profiles:cmd_forget")


def _add_refresh(sub: _Sub, options: Options, name: str) -> None:
    p = sub.add_parser(
        name,
        parents=[options.socket],
        help="fetch a new token now (also retries a failed credential)",
    )
    p.add_argument("name", metavar="NAME")
    p.set_defaults(command_func="profiles:cmd_refresh")


def _add_emulator(sub: _Sub, _options: Options, name: str) -> None:
    # Listed here for --help; main() hands `emulator` to the emulator's own parser so that
    # the other commands do not import it (it needs trio, jwt and cryptography).
    p = sub.add_parser(name, help="run a local IMS emulator (plain HTTP, loopback only)")
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _add_demo(sub: _Sub, _options: Options, name: str) -> None:
    p = sub.add_parser(name, help="the whole flow on this machine, no Adobe account needed")
    p.add_argument(
        "--keep", action="store_true", help="leave the demo's emulator and agent running"
    )
    p.set_defaults(command_func="agentctl:cmd_demo")


# Every subcommand, in --help order: its name and the function that adds its parser. A new
# command adds its `_add_NAME(sub, options, name)` above and one line here.
COMMANDS: dict[str, Callable[[_Sub, Options, str], None]] = {
    "start": _add_start,
    "serve": _add_serve,
    "stop": _add_stop,
    "reload": _add_reload,
    "service": _add_service,
    "add": _add_add,
    "status": _add_status,
    "list": _add_status,
    "forget": _add_forget,
    "refresh": _add_refresh,
    "emulator": _add_emulator,
    "demo": _add_demo,
}
