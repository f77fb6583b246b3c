"""The HTTP/1.1 server loop's test kit: a handler that echoes, raw requests, a dumb raw client.

Shared by tests/unit/test_httpserver.py and tests/unit/test_http_abuse.py.
"""

from __future__ import annotations

import itertools
import json
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio
import trio.testing

from aemagent.daemon.httpserver import Handler, Limits, Request, Response, serve_http

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

SMALL = Limits(max_head=512, max_body=64, request_timeout=10.0, idle_timeout=30.0)


async def echo(request: Request) -> Response:
    return Response.json(
        200,
        {
            "method": request.method,
            "target": request.target,
            "path": request.path,
            "query": dict(request.query),
            "body": request.body.decode("latin-1"),
            "host": request.header("Host"),
        },
    )


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        # Every answer these tests read is a JSON object: echo's, or the server's {"error": ...}.
        return cast("dict[str, Any]", json.loads(self.body))


class RawClient:
    """A deliberately dumb HTTP client: raw bytes out, a hand-rolled parser in."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes, sizes: tuple[int, ...] = (1, 2, 3, 5, 8, 13)) -> None:
        """Send `data` in odd pieces, letting the server read each one on its own."""
        pieces = itertools.cycle(sizes)
        while data:
            size = next(pieces)
            await self.stream.send_all(data[:size])
            data = data[size:]
            await trio.testing.wait_all_tasks_blocked()

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some()
        self.buffer += chunk
        return bool(chunk)

    async def reply(self, *, head_only: bool = False) -> Reply:
        while b"\r\n\r\n" not in self.buffer:
            assert await self._fill(), f"connection closed mid-response: {self.buffer!r}"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) (.*)", status_line)
        assert match, status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            assert await self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(match.group(1)), match.group(2), headers, body)

    async def closed(self) -> bool:
        """Whether the server closes the connection without sending anything more."""
        if self.buffer:
            return False
        return not await self._fill()


@asynccontextmanager
async def serving(handler: Handler = echo, limits: Limits = SMALL) -> AsyncIterator[RawClient]:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, server, handler, limits)
        yield RawClient(client)
        await client.aclose()


def get(target: str, *extra: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: aemagent", *extra, "", ""]
    return "\r\n".join(lines).encode()


def post(target: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: aemagent", f"Content-Length: {len(body)}", *extra]
    return "\r\n".join([*lines, "", ""]).encode() + body
