"""`aemagent`: start, stop and talk to the agent.

Management commands talk to the daemon over its socket with the same stdlib client as
`aem-token` (aemagent.wire); only `serve`, `emulator` and `demo` import trio. Exit codes are
`aem-token`'s (aemagent.exits): 0 ok, 1 unexpected, 2 no agent, 3 no such profile, 4 no usable
token, 64 usage. A command fails by raising an aemagent.errors error; main() prints it as one
line and exits with its `exit_code`.

The package: `parser` (the arguments, one function per subcommand), `calls` (one API call and its
errors), `agentctl` (start, serve, stop, reload, service, emulator, demo), `profiles` (add,
forget, refresh), `credinput` (reading a credential for `add`), `status`, `launch` (spawning the
daemon), `service` (systemd units and the launchd plist). main() imports the parser and the one
module of the command it runs.
"""

from __future__ import annotations

import importlib
import sys

from aemagent import exits
from aemagent.errors import AemAgentError, AgentUnreachable


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["emulator"]:
        from aemagent.cli.agentctl import run_emulator

        return run_emulator(argv[1:])
    from aemagent.cli.parser import build_parser

    if not argv:  # a new user's first try: the help, as `aemagent --help` gives it
        build_parser().print_help()
        return exits.OK
    args = build_parser(_command_name(argv)).parse_args(argv)
    module, name = args.command_func.split(":")
    try:
        command = getattr(importlib.import_module(f"aemagent.cli.{module}"), name)
        return int(command(args))
    except AgentUnreachable as exc:
        print(f"aemagent: {exc}; {exc.advice}", file=sys.stderr)
        return exc.exit_code
    except AemAgentError as exc:
        print(f"aemagent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return exits.INTERRUPTED


def _command_name(argv: list[str]) -> str | None:
    """The subcommand argv runs (its first word), or None when it starts with an option."""
    return None if argv[0].startswith("-") else argv[0]
