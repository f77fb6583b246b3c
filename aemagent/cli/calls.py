"""Talking to the daemon for the `aemagent` commands: one API call, its answer or an error.

The same stdlib client as `aem-token` (aemagent.wire). An error answer becomes a CommandError
whose exit code is the one aemagent.exits gives its HTTP status; no agent at the socket is
wire's AgentUnreachable, as for `aem-token` (exit 2).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from aemagent import exits
from aemagent.errors import CommandError, WireError
from aemagent.paths import socket_path
from aemagent.wire import Reply, request


def send(
    args: argparse.Namespace,
    method: str,
    target: str,
    body: Any = None,
    *,
    read_timeout: float = 10.0,
) -> Reply:
    """One API request, its body JSON; the raw reply, or AgentUnreachable or a CommandError."""
    path = socket_path(args.socket)
    payload = None if body is None else json.dumps(body).encode()
    headers = [("Accept", "application/json")]
    if payload is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        return request(
            path, method, target, body=payload, headers=headers, read_timeout=read_timeout
        )
    except WireError as exc:
        raise CommandError(f"bad answer from the agent at {path}: {exc}") from None


def call(
    args: argparse.Namespace,
    method: str,
    target: str,
    body: Any = None,
    *,
    read_timeout: float = 10.0,
) -> Any:
    """One API call; returns the decoded JSON answer, or raises as `send` and `decode` do."""
    return decode(send(args, method, target, body, read_timeout=read_timeout))


def decode(reply: Reply) -> Any:
    """A success's JSON, or a CommandError with the agent's message and the status's exit code."""
    try:
        data = json.loads(reply.body) if reply.body else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if 200 <= reply.status < 300:
        if data is None:
            raise CommandError(f"the agent answered {reply.status} without JSON")
        return data
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        raise CommandError(data["message"], exits.for_status(reply.status))
    raise CommandError(f"the agent answered HTTP {reply.status}; is it an older version?")
