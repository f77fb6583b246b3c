"""HTTP/1.1 server loop over a trio stream: a small, strict parser of our own.

Theory of operation. `serve_http` owns one connection: it reads bytes into a buffer until a
request head is complete, parses it, reads the body the head announces (Content-Length or
chunked), awaits the handler (a plain async function `Request -> Response`, with no knowledge of
sockets) and writes the `Response` back, then loops for the next request on the same connection
(keep-alive; pipelined bytes stay in the buffer) until either side closes.

Everything the peer can get wrong ends that connection and nothing else: malformed HTTP gets
400, a head or body over the limits gets 413 (decided before the body is read), a connection that
idles or trickles a request slower than the limits allow is closed without an answer, a peer that
hangs up is let go quietly, and a handler that raises gets 500 with the traceback logged. The
loop itself never raises, so one bad client cannot take down the daemon's nursery. `serve_http`
closes the stream when it returns.

Why not h11: it was most of the daemon's cost per request (bench/, docs/BENCHMARKS.md). A request
from our callers is a request line and a few headers; this parser is RFC 9112 for that subset and
strict about the rest: CRLF or bare LF line ends, no obsolete line folding, no whitespace before a
header's colon, exactly one Host on HTTP/1.1, Content-Length and Transfer-Encoding never together,
only the chunked transfer coding, HTTP/1.0 and 1.1 only (1.0 connections close after one answer).
`SocketIO` is a lean `trio.abc.Stream` over a connected trio socket, for the same reason:
`trio.SocketStream` costs a few extra microseconds per call that the daemon pays per request.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import types
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

import trio

from aemagent import __version__

logger = logging.getLogger("aemagent.http")

# Big enough that a 1 MiB body arrives in a handful of reads.
_RECEIVE_SIZE = 64 * 1024
# After an error answer we half-close and drain what the peer is still sending for this long:
# closing a TCP socket with unread input sends a RST, which can destroy the answer in flight.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024
# A '%' not followed by two hex digits: urllib would pass it through silently.
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Framing is ours to decide; a handler setting these would corrupt the connection.
_RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})
_SERVER = f"aemagent/{__version__}"

# RFC 9110 5.6.2 token; request-target is visible ASCII (RFC 9112 3.2); field values are VCHAR,
# obs-text, SP and HTAB (RFC 9110 5.5).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([!-~]+) HTTP/(1\.[01])")
# The value is stripped with bytes.strip, not in the pattern: `[ \t]*(.*?)[ \t]*` backtracks
# quadratically over a run of blanks inside a value (0.8 s for one 16 KiB line).
_FIELD = re.compile(rb"(" + _TOKEN + rb"):(.*)")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n]*)?")
_CHUNK_LINE_MAX = 1024  # a chunk-size line with its extensions, or one trailer line


class DropConnection(Exception):
    """Raised by a handler to close the connection without answering (fault injection)."""


@dataclass(frozen=True)
class Request:
    method: str  # "GET"
    target: str  # raw, "/v1/token?profile=a"
    path: str  # percent-decoded path, "/v1/token"
    query: Mapping[str, str] = field(default_factory=lambda: types.MappingProxyType({}))
    headers: tuple[tuple[str, str], ...] = ()  # names lower-cased
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The header's value; a repeated header's values joined with ", " (RFC 9110 5.3)."""
        name = name.lower()
        values = [value for key, value in self.headers if key == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        # The trailing newline keeps a shell prompt off the end of `curl` output.
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
        return cls(status, body.encode(), headers=headers)

    @classmethod
    def error(cls, status: int, code: str, message: str) -> Response:
        return cls.json(status, {"error": code, "message": message})


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Limits:
    max_head: int = 16 * 1024  # request line + headers; more -> 413
    max_body: int = 1024 * 1024  # more -> 413
    request_timeout: float = 10.0  # from the first byte of a request to its last
    idle_timeout: float = 30.0  # keep-alive idle before the connection is closed


DEFAULT_LIMITS = Limits()

_INTERNAL = Response.error(500, "internal", "internal error")


class _Reject(Exception):
    """The request cannot be served: answer `response` and close the connection."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _PeerGone(Exception):
    """The peer closed its side before a request was complete: nobody to answer."""


def _bad_request(message: str) -> _Reject:
    return _Reject(Response.error(400, "bad_request", message))


def _too_large(what: str, limit: int) -> _Reject:
    return _Reject(Response.error(413, "too_large", f"{what} is larger than {limit} bytes"))


class SocketIO(trio.abc.HalfCloseableStream):
    """A connected trio socket as a stream, with no per-call extras (see the module docstring).

    Not safe for concurrent sends or receives, which `serve_http` never makes."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.socket = sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            return await self.socket.recv(max_bytes or _RECEIVE_SIZE)
        except OSError as exc:
            raise _broken(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            sent = await self.socket.send(data)
            if sent < len(data):
                with memoryview(data) as view:
                    while sent < len(view):
                        sent += await self.socket.send(view[sent:])
        except OSError as exc:
            raise _broken(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.socket.wait_writable()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(trio.socket.SHUT_WR)
        except OSError as exc:
            raise _broken(exc) from exc

    async def aclose(self) -> None:
        self.socket.close()
        await trio.lowlevel.checkpoint()


def _broken(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def serve_http(
    stream: trio.abc.Stream, handler: Handler, limits: Limits = DEFAULT_LIMITS
) -> None:
    """Serve HTTP/1.1 requests on `stream` until the connection ends, then close it."""
    connection = _Connection(stream, limits)
    try:
        await connection.serve(handler)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the peer hung up
    except Exception:
        # A bug here must cost one connection, not the server.
        logger.exception("HTTP connection failed")
    finally:
        if isinstance(stream, SocketIO):
            stream.socket.close()  # what aclose_forcefully does, without its cancel scope
        else:
            await trio.aclose_forcefully(stream)


@dataclass
class _Head:
    """A parsed request head, before its body is read."""

    request: Request
    close: bool  # answer with Connection: close and end the connection
    length: int  # Content-Length, or -1 for a chunked body
    expect_continue: bool


class _Connection:
    def __init__(self, stream: trio.abc.Stream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.buffer = bytearray()
        self.method = ""  # of the request being read, once its head is parsed

    async def serve(self, handler: Handler) -> None:
        while True:
            try:
                head = await self.receive_request()
            except _Reject as reject:
                await self.send(reject.response, self.method, close=True)
                await self.linger()
                return
            if head is None:
                return
            if not await self.respond(handler, head):
                return

    # ---- reading

    async def _fill(self) -> None:
        data = await self.stream.receive_some(_RECEIVE_SIZE)
        if not data:
            raise _PeerGone
        self.buffer += data

    async def receive_request(self) -> _Head | None:
        """The next complete request, or None when the connection should close quietly."""
        limits = self.limits
        self.method = ""
        # Bytes of a pipelined request may already be buffered: then the request has begun.
        timeout = limits.request_timeout if self.buffer else limits.idle_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                head = self._parse_head(await self._read_head(scope))
                self.method = head.request.method
                if head.length == 0:
                    return head
                if head.expect_continue and not self.buffer:
                    await self.stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                if head.length > 0:
                    body = await self._read_exactly(head.length)
                else:
                    body = await self._read_chunked()
                head.request = _with_body(head.request, body)
                return head
            except _PeerGone:
                return None  # the peer left, between requests or mid-request: nobody to answer
        # Idle, or a request trickling in too slowly (slowloris): close without a 408, so a
        # slow peer gets nothing for its trouble.
        assert scope.cancelled_caught
        return None

    async def _read_head(self, scope: trio.CancelScope) -> bytes:
        """Read until the head is complete; consume it and its blank line, and return it."""
        max_head = self.limits.max_head
        searched = 0
        while True:
            # RFC 9112 2.2: ignore empty lines before a request line.
            while self.buffer.startswith((b"\r\n", b"\n")):
                del self.buffer[: 2 if self.buffer[0] == 13 else 1]
                searched = 0
            found = _HEAD_END.search(self.buffer, max(0, searched - 3))
            if found is not None:
                if found.start() > max_head:
                    raise _too_large("request head", max_head)
                head = bytes(self.buffer[: found.start()])
                del self.buffer[: found.end()]
                return head
            if len(self.buffer) > max_head:
                raise _too_large("request head", max_head)
            searched = len(self.buffer)
            started = bool(self.buffer)
            await self._fill()
            if not started:  # the first byte: from now on the request timeout runs
                scope.deadline = trio.current_time() + self.limits.request_timeout

    def _parse_head(self, raw: bytes) -> _Head:
        """Parse a request head, without its blank line."""
        lines = raw.split(b"\n")
        request_line = lines[0].removesuffix(b"\r")
        match = _REQUEST_LINE.fullmatch(request_line)
        if match is None:
            raise _bad_request("malformed HTTP request line")
        method_raw, target_raw, version = match.groups()
        self.method = method = method_raw.decode("ascii")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            line = line.removesuffix(b"\r")  # noqa: PLW2901
            field_match = _FIELD.fullmatch(line)
            if field_match is None or _BAD_VALUE.search(field_match[2]):
                if line[:1] in (b" ", b"\t"):
                    raise _bad_request("malformed HTTP request: obsolete line folding")
                raise _bad_request("malformed HTTP request: bad header line")
            value = field_match[2].strip(b" \t")
            headers.append((field_match[1].decode("ascii").lower(), value.decode("latin-1")))
        return self._check_head(method, target_raw, version, tuple(headers))

    def _check_head(
        self, method: str, target_raw: bytes, version: bytes, headers: tuple[tuple[str, str], ...]
    ) -> _Head:
        """Reject what can be rejected before reading the body."""
        limits = self.limits
        hosts = lengths = 0
        length = 0
        chunked = close = expect_continue = False
        for name, value in headers:
            if name == "host":
                hosts += 1
            elif name == "content-length":
                lengths += 1
                if lengths > 1:
                    raise _bad_request("malformed HTTP request: repeated Content-Length")
                length = _content_length(value)
            elif name == "transfer-encoding":
                if chunked or value.strip().lower() != "chunked":
                    raise _bad_request("malformed HTTP request: only chunked transfer is supported")
                chunked = True
            elif name == "connection":
                close = close or "close" in (t.strip().lower() for t in value.split(","))
            elif name == "expect" and value.lower() == "100-continue":
                expect_continue = version == b"1.1"
        if hosts > 1 or (version == b"1.1" and not hosts):
            raise _bad_request("malformed HTTP request: HTTP/1.1 needs exactly one Host header")
        if chunked and lengths:
            raise _bad_request("malformed HTTP request: both Content-Length and Transfer-Encoding")
        if length > limits.max_body:
            raise _too_large("request body", limits.max_body)
        path, query = _parse_target(target_raw)
        if lengths or chunked:  # framing values as h11 gives them: "3, 3" is 3, "Chunked" chunked
            headers = tuple(
                (n, v.split(",")[0].strip() if n == "content-length" else "chunked")
                if n in ("content-length", "transfer-encoding")
                else (n, v)
                for n, v in headers
            )
        request = Request(method, target_raw.decode("ascii"), path, query, headers)
        return _Head(
            request,
            close=close or version == b"1.0",
            length=-1 if chunked else length,
            expect_continue=expect_continue,
        )

    async def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        body = bytes(self.buffer[:size])
        del self.buffer[:size]
        return body

    async def _read_line(self) -> bytes:
        """One CRLF- or LF-terminated line of a chunked body, without its end."""
        searched = 0
        while (end := self.buffer.find(b"\n", searched)) < 0:
            if len(self.buffer) > _CHUNK_LINE_MAX:
                raise _bad_request("malformed HTTP request: chunk line too long")
            searched = len(self.buffer)
            await self._fill()
        if end > _CHUNK_LINE_MAX:
            raise _bad_request("malformed HTTP request: chunk line too long")
        line = bytes(self.buffer[:end]).removesuffix(b"\r")
        del self.buffer[: end + 1]
        return line

    async def _read_chunked(self) -> bytes:
        max_body = self.limits.max_body
        body = bytearray()
        while True:
            size_line = _CHUNK_SIZE.fullmatch(await self._read_line())
            if size_line is None:
                raise _bad_request("malformed HTTP request: bad chunk size")
            size = int(size_line[1], 16)
            if size == 0:
                break
            if len(body) + size > max_body:
                raise _too_large("request body", max_body)
            body += await self._read_exactly(size)
            if await self._read_line():
                raise _bad_request("malformed HTTP request: chunk data longer than its size")
        trailers = 0
        while await self._read_line():  # trailer fields: read and ignored
            trailers += 1
            if trailers > 100:
                raise _bad_request("malformed HTTP request: too many trailer fields")
        return bytes(body)

    # ---- answering

    async def respond(self, handler: Handler, head: _Head) -> bool:
        """Run the handler and send its answer; whether the connection stays open."""
        request = head.request
        try:
            response = await handler(request)
            data = _serialize(response, request.method, close=head.close)
        except DropConnection:
            return False
        except Exception:
            logger.exception("handler failed on %s %s", request.method, request.path)
            await self.send(_INTERNAL, request.method, close=True)
            await self.linger()
            return False
        await self.stream.send_all(data)
        return not head.close

    async def send(self, response: Response, method: str, *, close: bool) -> None:
        await self.stream.send_all(_serialize(response, method, close=close))

    async def linger(self) -> None:
        with trio.move_on_after(_LINGER_SECONDS):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            drained = 0
            while drained < _LINGER_BYTES:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    break
                drained += len(data)


def _content_length(value: str) -> int:
    """A Content-Length value (RFC 9110 8.6: a list of identical values is allowed)."""
    lengths = {v.strip() for v in value.split(",")}
    if len(lengths) != 1 or not (text := lengths.pop()).isdigit() or not text.isascii():
        raise _bad_request("malformed HTTP request: bad Content-Length")
    return int(text)


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"handler answered the invalid status {status}")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""  # an unregistered status: the reason phrase is optional
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")
    return line


def _serialize(response: Response, method: str, *, close: bool) -> bytes:
    """The bytes of `response`; raises if the handler built an invalid one."""
    if not isinstance(response, Response):
        raise TypeError(f"handler returned {type(response).__name__}, not Response")
    status = response.status
    head = [
        _status_line(status).decode("ascii"),
        f"Content-Type: {response.content_type}\r\n",
        "Cache-Control: no-store\r\n",  # tokens must never sit in a cache
        f"Server: {_SERVER}\r\n",
    ]
    if status not in (204, 304):
        head.append(f"Content-Length: {len(response.body)}\r\n")
    for name, value in response.headers:
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"handler set the reserved header {name}")
        head.append(f"{name}: {value}\r\n")
    if close:
        head.append("Connection: close\r\n")
    head.append("\r\n")
    data = "".join(head).encode("latin-1")
    if response.headers or _BAD_VALUE.search(response.content_type.encode("latin-1")):
        _check_fields(response)
    # HEAD, 204 and 304 answers carry no body.
    if method != "HEAD" and status not in (204, 304):
        data += response.body
    return data


def _check_fields(response: Response) -> None:
    for name, value in (("Content-Type", response.content_type), *response.headers):
        if not re.fullmatch(_TOKEN.decode(), name) or _BAD_VALUE.search(value.encode("latin-1")):
            raise ValueError(f"handler set an invalid header {name!r}")


def _parse_target(raw: bytes) -> tuple[str, Mapping[str, str]]:
    """Percent-decoded path and query of an origin-form target; raises _Reject(400)."""
    target = raw.decode("ascii")  # the request-line pattern admits visible ASCII only
    if not target.startswith("/"):
        raise _bad_request("request target must be a path starting with /")
    if "%" in target and _BAD_PERCENT.search(target):
        raise _bad_request("bad percent-encoding in request target")
    raw_path, _, raw_query = target.partition("?")
    if not raw_query and "%" not in raw_path:
        return raw_path, _NO_QUERY
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
        pairs = urllib.parse.parse_qsl(raw_query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise _bad_request("request target is not UTF-8 once percent-decoded") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise _bad_request(f"repeated query parameter {key!r}")
        query[key] = value
    return path, types.MappingProxyType(query)


_NO_QUERY: Mapping[str, str] = types.MappingProxyType({})


def _with_body(request: Request, body: bytes) -> Request:
    return Request(
        request.method, request.target, request.path, request.query, request.headers, body
    )
