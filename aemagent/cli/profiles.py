"""`aemagent add|forget|refresh`: load credentials into the agent, drop them, refresh a token."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from aemagent import exits
from aemagent.cli.calls import call
from aemagent.cli.credinput import read_credential
from aemagent.cli.status import human_duration
from aemagent.errors import AemAgentError, CommandError
from aemagent.wire import quote

# Requests that may wait for IMS (the daemon answers within ~20 s) get this read timeout.
_IMS_READ_TIMEOUT = 35.0
# After this long without IMS's answer, `add` says it is waiting (on a terminal only).
_WAITING_NOTE_AFTER = 1.0


def cmd_add(args: argparse.Namespace) -> int:
    if args.save and args.file == "-":
        raise CommandError(
            "--save records a FILE's path; for stdin, write a `command` profile in the config file",
            exits.USAGE,
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
    except CommandError as exc:
        if exc.exit_code != exits.USAGE:
            raise
        raise CommandError(
            f"cannot add {_what_was_read(args.file)}: {exc}", exc.exit_code
        ) from None
    name = profile["name"]
    what = f"{profile['kind']} credential, client id {profile.get('client_id')}"
    try:
        with _waiting_note("waiting for IMS…"):
            token = call(
                args, "GET", f"/v1/token?profile={quote(name)}", read_timeout=_IMS_READ_TIMEOUT
            )
    except CommandError as exc:
        if exc.exit_code != exits.NO_TOKEN:
            raise
        raise CommandError(
            f"added profile {name} ({what}), but it has no token: {exc}", exc.exit_code
        ) from None
    print(f"added profile {name} ({what}); token valid for {human_duration(token['expires_in'])}")
    for note in notes:  # only now: on failure, stderr has one line, the error
        print(f"aemagent: {note}", file=sys.stderr)
    if args.save:
        save_to_config(args, name)
    return exits.OK


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
        raise CommandError(f"added, but not saved: {exc}") from None
    print(f"saved profile {name} in {path} (the file's path, not its content)")


def _what_was_read(source: str) -> str:
    if source != "-":
        return source
    return "the pasted credential" if sys.stdin.isatty() else "the credential on standard input"


def cmd_forget(args: argparse.Namespace) -> int:
    if args.all == bool(args.names):
        raise CommandError("name the profiles to forget, or say --all (not both)", exits.USAGE)
    query = "?revoke=1" if args.revoke else ""
    timeout = _IMS_READ_TIMEOUT if args.revoke else 10.0
    if args.all:
        answer = call(args, "DELETE", f"/v1/profiles{query}", read_timeout=timeout)
        names = answer.get("forgotten", [])
        print(f"forgot {len(names)} profile(s)" + (f": {', '.join(names)}" if names else ""))
        for name, said in answer.get("revoked", {}).items():
            print(f"  {name}: {said}")
        return exits.OK
    code = exits.OK
    for name in args.names:
        try:
            answer = call(
                args, "DELETE", f"/v1/profiles/{quote(name)}{query}", read_timeout=timeout
            )
            said = answer.get("revoked", {}).get(name)
            print(f"forgot {name}" + (f"; {said}" if said else ""))
        except CommandError as exc:  # no agent at all (AgentUnreachable) stops at once
            print(f"aemagent: {exc}", file=sys.stderr)
            code = exc.exit_code
    return code


def cmd_refresh(args: argparse.Namespace) -> int:
    profile = call(
        args, "POST", f"/v1/profiles/{quote(args.name)}/refresh", read_timeout=_IMS_READ_TIMEOUT
    )
    print(
        f"refreshed {profile['name']}; token valid for {human_duration(profile['expires_in'] or 0)}"
    )
    return exits.OK
