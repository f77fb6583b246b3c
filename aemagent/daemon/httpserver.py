"""HTTP/1.1 server loop over a trio stream, with h11 as the parser.

Theory of operation. `serve_http` owns one connection: it feeds the bytes it receives to an h11
state machine, turns each complete request into a `Request`, awaits the handler (a plain async
function `Request -> Response`, with no knowledge of sockets) and writes the `Response` back,
then loops for the next request on the same connection (keep-alive on HTTP/1.1 unless the
request says close; pipelined bytes go on to the next request's parser) until either side
closes. h11 parses everything the peer sends; the answers, our own bytes, are serialized here
(`_serialize`): through h11 they cost as much again as the parse.

Everything the peer can get wrong ends that connection and nothing else: malformed HTTP (whatever
h11 refuses) gets 400, a head, a body or a header count over the limits gets 413 (decided before
the body is read), a peer that hangs up is let go quietly, and a handler that raises gets 500
with the traceback logged. The loop itself never raises, so one bad client cannot take down the
daemon's nursery; `serve_http` closes the stream when it returns.

Every wait has a deadline, so no peer holds a connection (and the daemon's slot) for free:

* between requests, `idle_timeout`, and at most `idle_total` summed over the connection's life;
* a request, from its first byte (the first received after the previous answer) to its last:
  `request_timeout`, however the bytes trickle in; h11 refuses empty lines before a request
  line, so they cannot restart it;
* every write: `send_timeout`. A peer that pipelines requests and never reads its answers fills
  the socket's buffer; once a write has waited that long, the connection is closed.

A peer that runs out a deadline is closed without an answer (no 408: a slow peer gets nothing
for its trouble).

`SocketIO` is a lean `trio.abc.Stream` over a connected trio socket: `trio.SocketStream` costs a
few extra microseconds per call that the daemon pays per request.
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

import h11
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
# h11 (0.16) refuses a Content-Length of more digits; older h11 would int() any number of them,
# and past 4,300 digits int() raises ValueError. Checked again here, before we convert it.
_MAX_LENGTH_DIGITS = 20


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
    max_headers: int = 100  # header fields in a head, or trailer fields; more -> 413
    request_timeout: float = 10.0  # from the first byte of a request to its last
    idle_timeout: float = 30.0  # keep-alive idle before the connection is closed
    idle_total: float = 300.0  # keep-alive idle summed over a connection's life
    send_timeout: float = 5.0  # for each answer to be written: the peer must read


DEFAULT_LIMITS = Limits()

_INTERNAL = Response.error(500, "internal", "internal error")


class _Reject(Exception):
    """The request cannot be served: answer `response` and close the connection."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Stalled(Exception):
    """The peer did not take an answer within `send_timeout`: close without more ado."""


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
    except _Stalled:
        logger.debug("closed a connection whose peer did not read its answer")
    except Exception:
        # A bug here must cost one connection, not the server.
        logger.exception("HTTP connection failed")
    finally:
        if isinstance(stream, SocketIO):
            stream.socket.close()  # what aclose_forcefully does, without its cancel scope
        else:
            await trio.aclose_forcefully(stream)


class _Connection:
    def __init__(self, stream: trio.abc.Stream, limits: Limits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        self.eof = False
        self.method = ""  # of the request being read, once its head is parsed
        self.close = False  # whether the request being read asks to close after its answer
        self.idle_left = limits.idle_total

    async def serve(self, handler: Handler) -> None:
        while True:
            try:
                request = await self.receive_request()
            except _Reject as reject:
                await self.send(reject.response, self.method, close=True)
                await self.linger()
                return
            except _PeerGone:
                return  # the peer left mid-request: nobody to answer
            if request is None:
                return
            if not await self.respond(handler, request):
                return
            self._next_cycle()

    def _next_cycle(self) -> None:
        """A fresh h11 parser for the next request, given what the peer has already sent.

        h11 only reads: our answers are written by `_serialize`, so h11 never learns of them and
        cannot cycle itself (`start_next_cycle` wants both sides done)."""
        data, closed = self.h11.trailing_data
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        if data:
            self.h11.receive_data(data)
        if closed:
            self.h11.receive_data(b"")

    # ---- reading

    async def receive_request(self) -> Request | None:
        """The next complete request, or None when the connection should close quietly."""
        limits = self.limits
        now = trio.current_time()
        # Bytes of a pipelined request may already be buffered: then the request has begun.
        started = bool(self.h11.trailing_data[0])
        if started:
            deadline = now + limits.request_timeout
        else:
            deadline = now + min(limits.idle_timeout, self.idle_left)
        idle_since = now
        self.method = ""
        pending: Request | None = None
        continued = False
        body = bytearray()
        while True:
            event = self._next_event()
            if event is h11.NEED_DATA:
                if pending is not None and not continued:
                    continued = True
                    if self.h11.they_are_waiting_for_100_continue:
                        await self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
                # A head is read at most `max_head` past what is buffered, so that h11 never
                # parses (only to refuse) much more than a head's worth of header lines.
                reading_head = self.h11.their_state is h11.IDLE
                size = limits.max_head + 1 if reading_head else _RECEIVE_SIZE
                data = None
                with trio.move_on_at(deadline):
                    data = await self.stream.receive_some(size)
                if data is None:
                    # Idle, or a request trickling in too slowly (slowloris): close
                    # without a 408, so a slow peer gets nothing for its trouble.
                    return None
                if data and not started:
                    started = True
                    now = trio.current_time()
                    self.idle_left -= now - idle_since
                    deadline = now + limits.request_timeout
                self.eof = not data
                self.h11.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                self.method = event.method.decode("ascii")
                pending = self._check_head(event)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body:
                    raise _too_large("request body", limits.max_body)
            elif isinstance(event, h11.EndOfMessage) and pending is not None:
                if len(event.headers) > limits.max_headers:
                    raise _Reject(_too_many_fields("trailer", limits.max_headers))
                return _with_body(pending, bytes(body)) if body else pending
            else:  # ConnectionClosed: the peer left between requests
                return None

    def _next_event(self) -> type[h11.NEED_DATA | h11.PAUSED] | h11.Event:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as exc:
            if self.eof:
                raise _PeerGone from exc
            if exc.error_status_hint == 431:  # h11's "Receive buffer too long"
                raise _too_large("request head", self.limits.max_head) from exc
            raise _bad_request(f"malformed HTTP request: {exc}") from exc
        except ValueError as exc:  # h11 before 0.16: int() of a 4,301-digit Content-Length
            raise _bad_request("malformed HTTP request: bad Content-Length") from exc

    def _check_head(self, event: h11.Request) -> Request:
        """Reject what can be rejected before reading the body; the Request, body still empty."""
        limits = self.limits
        # h11's buffer limit only catches a head that arrives incomplete: measure a complete one.
        raw = event.headers.raw_items()
        size = len(event.method) + len(event.target) + 12
        size += sum(len(name) + len(value) + 4 for name, value in raw)
        if size > limits.max_head:
            raise _too_large("request head", limits.max_head)
        if len(raw) > limits.max_headers:
            raise _Reject(_too_many_fields("header", limits.max_headers))
        # Names lower-cased as h11 does (iterating `event.headers` itself is slow: a Sequence).
        headers = tuple((n.decode("ascii").lower(), v.decode("latin-1")) for n, v in raw)
        # h11's own rule for keep-alive: HTTP/1.0, or a "close" among the Connection tokens.
        close = event.http_version < b"1.1"
        for name, value in headers:
            if name == "content-length" and (
                len(value) > _MAX_LENGTH_DIGITS or int(value) > limits.max_body
            ):
                raise _too_large("request body", limits.max_body)
            if name == "connection" and "close" in (
                token.strip(" \t").lower() for token in value.split(",")
            ):
                close = True
        self.close = close
        path, query = _parse_target(event.target)
        return Request(self.method, event.target.decode("ascii"), path, query, headers)

    # ---- answering

    async def respond(self, handler: Handler, request: Request) -> bool:
        """Run the handler and send its answer; whether the connection stays open."""
        close = self.close
        try:
            response = await handler(request)
            data = _serialize(response, request.method, close=close)
        except DropConnection:
            return False
        except Exception:
            logger.exception("handler failed on %s %s", request.method, request.path)
            await self.send(_INTERNAL, request.method, close=True)
            await self.linger()
            return False
        await self._send(data)
        return not close

    async def send(self, response: Response, method: str, *, close: bool) -> None:
        await self._send(_serialize(response, method, close=close))

    async def _send(self, data: bytes) -> None:
        with trio.move_on_after(self.limits.send_timeout):
            await self.stream.send_all(data)
            return
        raise _Stalled

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


class _PeerGone(Exception):
    """The peer closed its side before a request was complete: nobody to answer."""


def _too_many_fields(what: str, limit: int) -> Response:
    return Response.error(413, "too_large", f"request has more than {limit} {what} fields")


# What the handler may put in an answer: a field name is an RFC 9110 token; a value (and the
# content type) no control byte but HTAB.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not 200 <= status <= 999:  # 1xx are interim answers, not a handler's
            raise ValueError(f"handler answered the invalid status {status}")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""  # an unregistered status: the reason phrase is optional
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")
    return line


def _serialize(response: Response, method: str, *, close: bool) -> bytes:
    """The bytes of `response`; raises if the handler built an invalid one.

    Ours, not h11's `send`: writing an answer through h11 cost as much as parsing the request,
    and what it checks, the fields a handler sets, is checked here."""
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
    if response.headers or _BAD_VALUE.search(response.content_type):
        for name, value in (("Content-Type", response.content_type), *response.headers):
            if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                raise ValueError(f"handler set an invalid header {name!r}")
    data = "".join(head).encode("latin-1")
    # HEAD, 204 and 304 answers carry no body.
    if method != "HEAD" and status not in (204, 304):
        data += response.body
    return data


def _parse_target(raw: bytes) -> tuple[str, Mapping[str, str]]:
    """Percent-decoded path and query of an origin-form target; raises _Reject(400)."""
    target = raw.decode("ascii")  # h11 admits visible ASCII only (RFC 9112 3.2)
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
