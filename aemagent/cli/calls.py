"""Talking to the daemon for the `aemagent` commands: one API call, its answer or a CLIError.

The same stdlib client as `aem-token` (aemagent.wire); an error answer's HTTP status becomes the
command's exit code.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aemagent.paths import socket_path
from aemagent.wire import AgentUnreachable, Reply, WireError, request

EXIT_OK, EXIT_FAIL, EXIT_NO_AGENT, EXIT_NO_PROFILE, EXIT_NO_TOKEN, EXIT_USAGE = 0, 1, 2, 3, 4, 64
_EXIT_BY_STATUS = {400: EXIT_USAGE, 404: EXIT_NO_PROFILE, 409: EXIT_NO_PROFILE, 503: EXIT_NO_TOKEN}


class CLIError(Exception):
    """A failure to report as one line on stderr with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def send(
    args: argparse.Namespace,
    method: str,
    target: str,
    body: Any = None,
    *,
    read_timeout: float = 10.0,
) -> Reply:
    """One API request, its body JSON; returns the raw reply or raises CLIError if none came."""
    path = socket_path(args.socket)
    payload = None if body is None else json.dumps(body).encode()
    headers = [("Accept", "application/json")]
    if payload is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        return request(
            path, method, target, body=payload, headers=headers, read_timeout=read_timeout
        )
    except AgentUnreachable as exc:
        raise CLIError(f"{exc}; {exc.advice}", EXIT_NO_AGENT) from None
    except WireError as exc:
        raise CLIError(f"bad answer from the agent at {path}: {exc}") from None


def call(
    args: argparse.Namespace,
    method: str,
    target: str,
    body: Any = None,
    *,
    read_timeout: float = 10.0,
) -> Any:
    """One API call; returns the decoded JSON answer or raises CLIError."""
    return decode(send(args, method, target, body, read_timeout=read_timeout))


def decode(reply: Reply) -> Any:
    """A success's JSON, or a CLIError with the agent's message and the status's exit code."""
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
