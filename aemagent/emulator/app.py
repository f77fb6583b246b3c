"""`aemagent emulator`: a local IMS stand-in over loopback HTTP, for trying the agent and for tests.

It registers one AEM service integration and one OAuth server-to-server client, freshly generated
at every start, and answers what Adobe IMS answers, as far as the agent relies on it:

    POST /ims/exchange/jwt          JWT exchange; every claim rule checked; expires_in in ms
    POST /ims/token/v3              client credentials; expires_in in s
    POST /ims/invalidate_token/v2   revokes a token the emulator issued to that client
    GET  /aem/...                   AEM stand-in: 200 only for a valid, unexpired, unrevoked token

Every answer carries `X-Debug-Id` and a `Date` on the emulator's clock (real time + an offset,
for clock-skew tests). Test hooks, loopback only like everything else:

    POST /_emulator/faults     {"endpoint": "jwt"|"token"|"invalidate"|"aem"|"any", "count": N,
                                "status", "body", "error", "error_description", "retry_after",
                                "location", "delay", "drop", "malformed"}: the next N requests
                                fail that way
    DELETE /_emulator/faults   forget pending faults
    GET /_emulator/requests    the requests seen (field names and JWT claims, never a secret)
    DELETE /_emulator/requests forget them
    GET /_emulator/stats       {"in_flight", "max_in_flight", "exchanges"}: requests to the two
                               token endpoints being answered now, the most ever at once, and
                               in all (the high-water mark shows the agent's cap on IMS calls)
    DELETE /_emulator/stats    count afresh (max_in_flight restarts from in_flight); answers them
    GET|POST /_emulator/clock  read or set {"offset": seconds}

`--exchange-delay SECONDS` holds every request to the token endpoints that long before answering
(as real IMS takes a noticeable while), so that concurrent exchanges overlap and can be counted.

It serves plain HTTP, so it binds loopback addresses only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from aemagent.daemon.httpserver import serve_http
from aemagent.emulator.faults import Fault
from aemagent.emulator.ims import DEFAULT_TOKEN_LIFETIME, Emulator
from aemagent.emulator.tokens import write_credential_files

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DEFAULT_PORT",
    "Emulator",
    "EmulatorSettings",
    "Fault",
    "RunningEmulator",
    "add_arguments",
    "run",
    "serve_emulator",
]

logger = logging.getLogger("aemagent.emulator")

DEFAULT_PORT = 8765


@dataclass(frozen=True)
class EmulatorSettings:
    host: str = "127.0.0.1"
    port: int = 0
    token_lifetime: int = DEFAULT_TOKEN_LIFETIME  # seconds, for every token issued
    clock_offset: float = 0.0  # the emulator's clock = real time + this
    write_credentials: Path | None = None
    exchange_delay: float = 0.0  # seconds every token request is held before its answer


@dataclass(frozen=True)
class RunningEmulator:
    url: str  # "http://127.0.0.1:PORT", the advertised IMS base
    port: int
    emulator: Emulator
    credentials: Mapping[str, Path]  # "service", "oauth", "devtoken"; empty unless written


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve_emulator(
    settings: EmulatorSettings,
    *,
    task_status: trio.TaskStatus[RunningEmulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, write the credential files if asked, report a RunningEmulator, then serve."""
    _require_loopback(settings.host)
    listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    try:
        port = listeners[0].socket.getsockname()[1]
        url = base_url(settings.host, port)
        emulator = await trio.to_thread.run_sync(
            partial(
                Emulator,
                url,
                token_lifetime=settings.token_lifetime,
                clock_offset=settings.clock_offset,
                exchange_delay=settings.exchange_delay,
            )
        )
        paths: Mapping[str, Path] = {}
        if settings.write_credentials is not None:
            paths = await trio.to_thread.run_sync(
                write_credential_files, settings.write_credentials, emulator.credential_documents()
            )
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    logger.info("IMS emulator listening on %s", url)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            trio.serve_listeners, partial(serve_http, handler=emulator.handle), listeners
        )
        task_status.started(RunningEmulator(url, port, emulator, paths))


def _require_loopback(host: str) -> str:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{host!r} is not a loopback address; the emulator serves plain HTTP")
    return host


# ---- command line ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="TCP port; 0 picks a free one (default %(default)s)",
    )
    parser.add_argument(
        "--host",
        type=_loopback_argument,
        default="127.0.0.1",
        help="loopback address to bind, never another: it is plain HTTP (default %(default)s)",
    )
    parser.add_argument(
        "--write-credentials",
        metavar="DIR",
        type=Path,
        help="write service.json, oauth.json and devtoken.json for this emulator into DIR",
    )
    parser.add_argument(
        "--token-lifetime",
        metavar="SECONDS",
        type=_positive_int,
        default=DEFAULT_TOKEN_LIFETIME,
        help="lifetime of every token issued (default %(default)s)",
    )
    parser.add_argument(
        "--clock-offset",
        metavar="SECONDS",
        type=_finite_float,
        default=0.0,
        help="run the emulator's clock this far ahead of real time (negative: behind)",
    )
    parser.add_argument(
        "--exchange-delay",
        metavar="SECONDS",
        type=_delay,
        default=0.0,
        help="answer every token request this much later, as real IMS is slow (default 0)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; print one JSON line on stdout once serving."""
    settings = EmulatorSettings(
        host=args.host,
        port=args.port,
        token_lifetime=args.token_lifetime,
        clock_offset=args.clock_offset,
        write_credentials=args.write_credentials,
        exchange_delay=args.exchange_delay,
    )
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        return trio.run(_main, settings)
    except KeyboardInterrupt:  # a SIGINT before the signal receiver was open
        return 0


async def _main(settings: EmulatorSettings) -> int:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                running: RunningEmulator = await nursery.start(serve_emulator, settings)
            except (OSError, ValueError) as exc:
                print(f"aemagent emulator: cannot start: {exc}", file=sys.stderr)
                return 1
            line: dict[str, Any] = {"url": running.url, "pid": os.getpid()}
            if running.credentials:
                line["credentials"] = {
                    name: str(path) for name, path in running.credentials.items()
                }
            print(json.dumps(line), flush=True)
            async for signum in signals:
                logger.info("stopping on %s", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535)")
    return port


def _loopback_argument(text: str) -> str:
    try:
        return _require_loopback(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of seconds")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def _delay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 600:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 600")
    return value
