"""What attackers found in the HTTP layer, each as a test that failed before h11 came back.

1. Connections never freed: a peer that pipelines requests and never reads its answers, once the
   socket's buffer was full, held its connection (and a slot of the daemon's connection cap)
   forever, since writes had no deadline; `\\r\\n` every 5 s restarted the request deadline
   forever; keep-alive idle time had no bound over a connection's life.
2. The hand-written parser accepted what h11 refuses: bare LF in chunked bodies, any trailer
   line, `Transfer-Encoding: chunked\\xa0`, `Content-Length: 3\\xa0` (str.strip() took the
   no-break space for a blank).
3. A 4,301-digit Content-Length raised ValueError out of the parser (Python's int digit limit):
   the peer got no answer and the log a traceback.

The unit tests run `serve_http` over memory streams on trio's MockClock (virtual time: exact and
instant); the daemon test serves on a real Unix socket in process.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from fakes import FakeIMS, LinkedClock
from rawhttp import SMALL, echo, get, serving

from aemagent.daemon.httpserver import Limits, Request, Response, serve_http
from aemagent.daemon.server import DaemonSettings, serve_agent

# SMALL's deadlines (request 10 s, idle 30 s) with the defaults for the rest: the send
# deadline is the default one (5 s).
SEND_TIMEOUT = Limits().send_timeout


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def http_errors():
    errors = _Errors()
    logger = logging.getLogger("aemagent.http")
    logger.addHandler(errors)
    try:
        yield errors.records
    finally:
        logger.removeHandler(errors)


async def _push(stream: trio.abc.SendStream, data: bytes) -> None:
    """Send `data`, and stop quietly once the server has closed the connection."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)


# ---- 1. connections are freed


async def test_a_peer_that_pipelines_and_never_reads_is_closed_by_the_send_deadline(
    autojump_clock, http_errors
):
    """A lockstep stream has no buffer: the server's first answer waits for a read that never
    comes, as on a socket whose buffer the answers have filled. Before: that write waited
    forever (the fail_after below fired). Now the connection closes `send_timeout` after it."""
    client, server = trio.testing.lockstep_stream_pair()
    served = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            await serve_http(server, echo, SMALL)
            served.set()

        nursery.start_soon(serve)
        nursery.start_soon(_push, client, get("/v1/health") * 50)
        start = trio.current_time()
        with trio.fail_after(SMALL.idle_timeout * 10):
            await served.wait()
        assert trio.current_time() - start == pytest.approx(SEND_TIMEOUT)
        nursery.cancel_scope.cancel()
    assert not http_errors
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"x")  # serve_http closed its end


async def test_an_error_answer_nobody_reads_is_bounded_too(autojump_clock):
    """The 400 for a malformed request is written under the same deadline."""
    client, server = trio.testing.lockstep_stream_pair()
    served = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            await serve_http(server, echo, SMALL)
            served.set()

        nursery.start_soon(serve)
        nursery.start_soon(_push, client, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
        with trio.fail_after(SMALL.idle_timeout * 10):
            await served.wait()
        nursery.cancel_scope.cancel()


async def test_empty_lines_every_5_s_do_not_keep_a_connection_open(autojump_clock):
    """Before: each `\\r\\n` was skipped and restarted the request deadline, so a line every 5 s
    (under the 10 s request timeout) held the connection for as long as the peer liked; the
    fail_after fired. h11 refuses an empty line before a request line (400), and the deadline of
    a request runs from its first byte whatever the bytes are."""
    async with serving() as client, trio.open_nursery() as nursery:

        async def blank_lines() -> None:
            try:
                while True:
                    await client.stream.send_all(b"\r\n")
                    await trio.sleep(5)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(blank_lines)
        start = trio.current_time()
        with trio.fail_after(SMALL.idle_timeout * 10):
            while await client._fill():
                pass
        assert trio.current_time() - start <= SMALL.request_timeout
        if client.buffer:  # h11's answer; never a served request
            assert client.buffer.startswith(b"HTTP/1.1 400 ")
        nursery.cancel_scope.cancel()


async def test_the_request_deadline_runs_from_the_first_byte_after_an_answer(autojump_clock):
    async with serving() as client:
        await client.send(get("/one"))
        assert (await client.reply()).status == 200
        await trio.sleep(SMALL.idle_timeout / 2)  # idle: within the idle timeout
        start = trio.current_time()
        for byte in b"GET /two ":  # a byte a second, 9 s in all
            await client.stream.send_all(bytes([byte]))
            await trio.sleep(1)
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(SMALL.request_timeout)


async def test_keep_alive_idle_time_is_bounded_over_the_connection_s_life(autojump_clock):
    """A request every 20 s never runs out the 30 s idle timeout; before, such a connection was
    kept for ever. Now once its idle time adds up to `idle_total`, it is closed."""
    limits = Limits(max_head=512, max_body=64, idle_timeout=30.0, idle_total=90.0)
    async with serving(limits=limits) as client:
        start = trio.current_time()
        answered = 0
        with trio.fail_after(limits.idle_total * 10):
            while True:
                await client.send(get(f"/{answered}"))
                assert (await client.reply()).status == 200
                answered += 1
                with trio.move_on_after(20):
                    assert await client.closed()
                    break
        # Idle 20 s four times (80 s), then closed 10 s into the fifth wait.
        assert answered == 5
        assert trio.current_time() - start == pytest.approx(limits.idle_total)


# ---- 2. what h11 refuses is refused

CHUNKED = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("raw", "answer"),
    [
        # Bare LF in chunk lines: h11 needs CRLF, and waits for it until the peer leaves.
        pytest.param(CHUNKED + b"3\nabc\n0\n\n", None, id="bare-LF-chunk-lines"),
        pytest.param(CHUNKED + b"3\r\nabc\n0\r\n\r\n", 400, id="bare-LF-after-chunk-data"),
        pytest.param(CHUNKED + b"3\rabc\r\n0\r\n\r\n", 400, id="bare-CR-in-chunk-size"),
        # Trailer lines are header lines: the same rules.
        pytest.param(CHUNKED + b"0\r\ngarbage\r\n\r\n", 400, id="trailer-without-colon"),
        pytest.param(CHUNKED + b"0\r\nX-T: a\x00b\r\n\r\n", 400, id="trailer-with-NUL"),
        pytest.param(CHUNKED + b"0\r\nX-T : 1\r\n\r\n", 400, id="trailer-space-before-colon"),
        pytest.param(CHUNKED + b"0\r\n folded\r\n\r\n", 400, id="trailer-folded"),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\xa0\r\n\r\n0\r\n\r\n",
            400,
            id="TE-chunked-NBSP",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\xa0\r\n\r\nabc",
            400,
            id="CL-3-NBSP",
        ),
    ],
)
async def test_what_h11_refuses_is_never_served(raw: bytes, answer: int | None, http_errors):
    """Before, each of these reached the handler (a 200 here)."""
    served: list[Request] = []

    async def record(request: Request) -> Response:
        served.append(request)
        return Response(200)

    async with serving(record) as client:
        await client.send(raw, sizes=(7, 11))
        await client.stream.send_eof()
        if answer is None:
            assert await client.closed()
        else:
            reply = await client.reply()
            assert (reply.status, reply.json()["error"]) == (answer, "bad_request")
            assert await client.closed()
    assert served == []
    assert not http_errors


async def test_a_bare_lf_in_a_trailer_is_what_h11_makes_of_it():
    """h11 reads trailer lines as it reads a head, where it takes a bare LF as a line end:
    served, as h11 does, with the body intact."""
    async with serving() as client:
        await client.send(CHUNKED + b"3\r\nabc\r\n0\r\nX-T: 1\n\n" + get("/next"))
        assert (await client.reply()).json()["body"] == "abc"
        assert (await client.reply()).json()["path"] == "/next"


async def test_too_many_trailer_fields_get_413():
    trailers = b"".join(b"X-%d: 1\r\n" % i for i in range(SMALL.max_headers + 1))
    async with serving(limits=Limits(max_head=16 * 1024, max_body=64)) as client:
        await client.stream.send_all(CHUNKED + b"0\r\n" + trailers + b"\r\n")
        reply = await client.reply()
        assert (reply.status, reply.json()["error"]) == (413, "too_large")
        assert await client.closed()


async def test_too_many_header_fields_get_413():
    fields = [f"X-{i}: 1" for i in range(SMALL.max_headers)]  # with Host, one too many
    async with serving(limits=Limits(max_head=16 * 1024)) as client:
        await client.stream.send_all(get("/", *fields))
        reply = await client.reply()
        assert (reply.status, reply.json()["error"]) == (413, "too_large")
        assert "header fields" in reply.json()["message"]
        assert await client.closed()


# ---- 3. a Content-Length too long for int()


@pytest.mark.parametrize("digits", [21, 4300, 4301, 5000])
async def test_a_content_length_of_thousands_of_digits_is_a_400(digits: int, http_errors):
    """Before: past 4,300 digits, int() raised ValueError out of the parser; the connection
    closed unanswered and the log said "HTTP connection failed" with a traceback. h11 (0.16)
    refuses more than 20 digits; older h11 raised the same ValueError, which is guarded too."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * digits + b"\r\n\r\n"
    async with serving(limits=Limits(max_head=16 * 1024)) as client:
        await client.stream.send_all(head + b"abc")
        reply = await client.reply()
        assert reply.status in (400, 413)
        assert reply.json()["error"] in ("bad_request", "too_large")
        assert await client.closed()
    assert not http_errors


async def test_a_valueerror_inside_h11_is_a_400(monkeypatch, http_errors):
    """The guard for h11 before 0.16, whose framing code ran int() on any number of digits."""
    import h11

    def old_h11_next_event(self):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")

    monkeypatch.setattr(h11.Connection, "next_event", old_h11_next_event)
    async with serving() as client:
        await client.stream.send_all(get("/"))
        reply = await client.reply()
        assert (reply.status, reply.json()["error"]) == (400, "bad_request")
    assert not http_errors


# ---- 1, on the daemon: a real Unix socket, the connection cap, the default limits

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED")

CAP = 8
PIPELINED = b"GET /v1/health HTTP/1.1\r\nHost: aemagent\r\n\r\n" * 5000


async def _serve(settings: DaemonSettings, *, task_status: trio.TaskStatus[str]) -> None:
    clock = LinkedClock()
    await serve_agent(settings, clock=clock, ims=FakeIMS(clock), task_status=task_status)  # type: ignore[arg-type]


async def _connect(path: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return sock


async def _health(path: str) -> int:
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await sock.connect(path)
        await sock.send(b"GET /v1/health HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := await sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@linux_only
async def test_peers_that_never_read_do_not_keep_the_daemon_from_answering(base: Path):
    """As many connections as the daemon's cap each pipeline 5,000 requests and never read:
    the daemon answers until the socket buffers are full, then its writes wait. Before, they
    waited forever, every slot stayed taken, and a health check from anyone else was never
    answered (the fail_after fired; with the daemon's 1,024 slots, 1,030 such connections did
    it). Now each stalled write gives up after the send deadline, and the slots are freed."""
    directory = base / "run"
    directory.mkdir(mode=0o700)
    settings = DaemonSettings(socket_path=str(directory / "agent.sock"), max_connections=CAP)
    held: list[trio.socket.SocketType] = []
    try:
        async with trio.open_nursery() as nursery:
            path = await nursery.start(_serve, settings)
            for _ in range(CAP):
                sock = await _connect(path)
                held.append(sock)
                nursery.start_soon(_push_socket, sock, PIPELINED)
            with trio.fail_after(SEND_TIMEOUT + 30):  # generous: the machine is shared
                assert await _health(path) == 200
            nursery.cancel_scope.cancel()
    finally:
        for sock in held:
            sock.close()


async def _push_socket(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[await sock.send(view) :]
    except OSError:
        pass  # the daemon closed it
