"""The HTTP/1.1 server loop, driven through memory streams with requests split into odd chunks."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from rawhttp import SMALL, RawClient, echo, get, post, serving

from aemagent import __version__
from aemagent.daemon.httpserver import DropConnection, Limits, Request, Response, serve_http

# ---- ordinary requests ----


async def test_get_decodes_path_and_query():
    async with serving() as client:
        await client.send(get("/v1/pro%20files?profile=a%2Fb&url=&x=1+2"))
        reply = await client.reply()
    assert reply.status == 200
    assert reply.reason == "OK"
    assert reply.json() == {
        "method": "GET",
        "target": "/v1/pro%20files?profile=a%2Fb&url=&x=1+2",
        "path": "/v1/pro files",
        "query": {"profile": "a/b", "url": "", "x": "1 2"},
        "body": "",
        "host": "aemagent",
    }
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["server"] == f"aemagent/{__version__}"
    assert int(reply.headers["content-length"]) == len(reply.body)


async def test_post_body():
    async with serving() as client:
        await client.send(post("/v1/profiles", b'{"name":"a"}', "Content-Type: application/json"))
        reply = await client.reply()
    assert reply.json()["body"] == '{"name":"a"}'


async def test_keep_alive_then_connection_close():
    async with serving() as client:
        await client.send(get("/one"))
        assert (await client.reply()).json()["path"] == "/one"
        await client.send(post("/two", b"2"))
        assert (await client.reply()).json()["body"] == "2"
        await client.send(get("/three", "Connection: close"))
        reply = await client.reply()
        assert reply.headers["connection"] == "close"
        assert await client.closed()


async def test_pipelined_requests_in_one_write():
    async with serving() as client:
        await client.stream.send_all(get("/a") + post("/b", b"xyz") + get("/c"))
        paths = [(await client.reply()).json()["path"] for _ in range(3)]
    assert paths == ["/a", "/b", "/c"]


async def test_http_10_closes_after_one_answer():
    async with serving() as client:
        await client.send(b"GET /old HTTP/1.0\r\n\r\n")
        assert (await client.reply()).status == 200
        assert await client.closed()


async def test_chunked_body():
    body = b"4\r\nwiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\n\r\n"
    head = b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with serving(limits=Limits()) as client:
        await client.send(head + body, sizes=(1, 3, 7))
        reply = await client.reply()
    assert reply.json()["body"] == "wikipedia in \r\n\r\nchunks."


async def test_expect_100_continue():
    async with serving() as client:
        await client.send(post("/e", b"", "Expect: 100-continue").replace(b"0\r\n", b"5\r\n"))
        interim = await client.reply(head_only=True)
        assert interim.status == 100
        await client.send(b"hello")
        reply = await client.reply()
    assert reply.json()["body"] == "hello"


async def test_head_answers_without_body():
    async with serving() as client:
        await client.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n" + get("/after"))
        head = await client.reply(head_only=True)
        assert head.status == 200
        assert int(head.headers["content-length"]) > 0
        assert (await client.reply()).json()["path"] == "/after"


async def test_request_header_lookup_joins_repeats():
    request = Request("GET", "/", "/", headers=(("x-a", "1"), ("x-b", "2"), ("x-a", "3")))
    assert request.header("X-A") == "1, 3"
    assert request.header("x-b") == "2"
    assert request.header("x-c") is None


def test_response_helpers():
    assert json.loads(Response.error(404, "not_found", "no such profile").body) == {
        "error": "not_found",
        "message": "no such profile",
    }
    response = Response.json(201, {"a": "é"}, headers=(("X-A", "1"),))
    assert (response.status, response.headers) == (201, (("X-A", "1"),))
    assert json.loads(response.body.decode("utf-8")) == {"a": "é"}


# ---- limits ----


async def test_head_over_limit_trickling_in_gets_413():
    async with serving() as client:
        await client.stream.send_all(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 600)
        reply = await client.reply()
        assert reply.status == 413
        assert reply.json()["error"] == "too_large"
        assert await client.closed()


async def test_complete_head_over_limit_in_one_write_gets_413():
    async with serving() as client:
        await client.stream.send_all(get("/", "X-Big: " + "a" * 600))
        reply = await client.reply()
        assert (reply.status, reply.json()["error"]) == (413, "too_large")
        assert await client.closed()


async def test_body_over_limit_by_content_length_gets_413_before_the_body():
    async with serving() as client:
        # Only the head is sent: the answer must not wait for the 1000 bytes announced.
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        reply = await client.reply()
        assert (reply.status, reply.json()["error"]) == (413, "too_large")
        assert "body" in reply.json()["message"]
        assert await client.closed()


async def test_expect_100_continue_over_limit_gets_413_and_no_100():
    async with serving() as client:
        await client.send(post("/", b"x" * 100, "Expect: 100-continue")[:-100])
        assert (await client.reply()).status == 413


async def test_chunked_body_over_limit_gets_413():
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with serving() as client:
        await client.stream.send_all(head + b"40\r\n" + b"x" * 64 + b"\r\n" + b"1\r\nx\r\n")
        reply = await client.reply()
        assert (reply.status, reply.json()["error"]) == (413, "too_large")
        assert await client.closed()


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",  # a TLS hello
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        get("/a%zzb"),
        get("/a%ffb"),  # not UTF-8 once decoded
        get("/?a=%ff"),
        get("/?profile=a&profile=b"),
        get("*"),
        get("http://aemagent/v1/health"),
    ],
)
async def test_malformed_requests_get_400_then_close(raw: bytes):
    async with serving() as client:
        await client.send(raw)
        reply = await client.reply()
        assert reply.status == 400
        assert reply.json()["error"] == "bad_request"
        assert await client.closed()


async def test_repeated_query_key_is_named():
    async with serving() as client:
        await client.send(get("/v1/token?profile=a&profile=b"))
        assert "profile" in (await client.reply()).json()["message"]


# ---- timeouts (virtual time) ----


async def test_idle_connection_closes_quietly(autojump_clock):
    async with serving() as client:
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(SMALL.idle_timeout)


async def test_idle_keep_alive_closes_after_idle_timeout(autojump_clock):
    async with serving() as client:
        await client.send(get("/"))
        await client.reply()
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(SMALL.idle_timeout)


async def test_slow_request_closes_without_answer(autojump_clock):
    async with serving() as client:
        start = trio.current_time()
        for byte in b"GET / HTT":  # a byte a second: no single read waits long
            await client.stream.send_all(bytes([byte]))
            await trio.sleep(1)
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(SMALL.request_timeout)


async def test_slow_body_closes_without_answer(autojump_clock):
    async with serving() as client:
        await client.stream.send_all(post("/", b"x" * 10)[:-5])
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(SMALL.request_timeout)


# ---- handler failures and hang-ups ----


async def test_handler_exception_gives_500_and_is_logged(caplog):
    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    async with serving(broken) as client:
        await client.send(get("/x"))
        reply = await client.reply()
        assert reply.status == 500
        assert reply.json() == {"error": "internal", "message": "internal error"}
        assert await client.closed()
    [record] = [r for r in caplog.records if r.name == "aemagent.http"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None


async def test_invalid_response_from_handler_gives_500(caplog):
    async def bad_header(request: Request) -> Response:
        return Response(200, b"x", headers=(("Content-Length", "5"),))

    async with serving(bad_header) as client:
        await client.send(get("/x"))
        assert (await client.reply()).status == 500


async def test_drop_connection_closes_without_answer():
    async def drop(request: Request) -> Response:
        raise DropConnection

    async with serving(drop) as client:
        await client.send(get("/x"))
        assert await client.closed()


async def test_peer_hanging_up_mid_request_is_quiet(caplog):
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, server, echo, SMALL)
        await client.send_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        await client.aclose()
    assert not caplog.records


async def test_peer_hanging_up_before_reading_the_answer_is_quiet(caplog, autojump_clock):
    async def slow(request: Request) -> Response:
        await trio.sleep(1)
        return Response(200, b"late")

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, server, slow, SMALL)
        await client.send_all(get("/"))
        await client.aclose()
    assert not caplog.records


async def test_cancellation_closes_the_stream():
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_http, server, echo, SMALL)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert await client.receive_some() == b""


# ---- properties ----

REQUESTS = get("/a?x=1") + post("/b", b"body") + get("/c", "Connection: close")


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=10))
def test_any_chunking_gives_the_same_answers(sizes):
    async def main():
        async with serving(limits=Limits()) as client:
            await client.send(REQUESTS, sizes=tuple(sizes))
            replies = [(await client.reply()).json() for _ in range(3)]
            assert await client.closed()
        assert [r["path"] for r in replies] == ["/a", "/b", "/c"]
        assert replies[1]["body"] == "body"

    trio.run(main)


FRAGMENTS = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"/x?a=1",
    b"&a=2",
    b"%ff",
    b"%2",
    b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n",
    b"Host: x\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: close\r\n",
    b"X-Big: " + b"a" * 300 + b"\r\n",
    b"\r\n",
    b"hello",
    b"5\r\nhello\r\n",
    b"0\r\n\r\n",
    b"\x00",
    b"\xff",
]

HOSTILE = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.sampled_from(FRAGMENTS), max_size=25).map(b"".join),
    st.tuples(st.lists(st.sampled_from(FRAGMENTS), max_size=10), st.binary(max_size=200)).map(
        lambda t: b"".join(t[0]) + t[1]
    ),
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _parse_all(data: bytes) -> list[int]:
    """Statuses of the HTTP/1.1 responses `data` consists of; fails if it is anything else."""
    statuses = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"truncated response head {head!r}"
        status_line, *lines = head.split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.1 (\d{3}) [ -~]*", status_line)
        assert match, status_line
        headers = dict(line.lower().split(b": ", 1) for line in lines)
        length = int(headers.get(b"content-length", b"0"))
        # An answer to HEAD announces a length but carries no body; our bodies are JSON or empty.
        # (so an answer that ends the data with no body is one to HEAD).
        if data and not data.startswith(b"HTTP/1.1 "):
            assert len(data) >= length, "truncated body"
            data = data[length:]
        statuses.append(int(match.group(1)))
    return statuses


@settings(max_examples=200, deadline=None)
@given(raw=HOSTILE)
def test_any_input_gives_http_answers_or_a_close(raw):
    async def ok(request: Request) -> Response:
        return Response(200)

    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        received = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_http, server, ok, SMALL)
            await client.send_all(raw)
            await client.send_eof()
            while chunk := await client.receive_some():
                received += chunk
            await client.aclose()
        return received

    errors = _Errors()
    logger = logging.getLogger("aemagent.http")
    logger.addHandler(errors)
    try:
        received = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(errors)
    assert not errors.records, errors.records[0].getMessage()
    assert set(_parse_all(received)) <= {100, 200, 400, 413}


# ---- h11 is the parser: what we serve is what h11 reads, and nothing else escapes ----

LINE_ENDS = st.sampled_from([b"\r\n", b"\n"])
REQUEST_LINES = st.sampled_from(
    [b"GET /v1/token", b"POST /v1/profiles", b"HEAD /x?a=1", b"DELETE /p%20q", b"GET *", b"G@T /"]
).flatmap(lambda line: st.sampled_from([line + b" HTTP/1.1", line + b" HTTP/1.0", line]))
HEADER_LINES = st.sampled_from(
    [
        b"Host: aemagent",
        b"Host: other",
        b"Host:",
        b"Accept: text/plain",
        b"Content-Length: 3",
        b"Content-Length: 03",
        b"Content-Length: 3, 3",
        b"Content-Length: 3, 4",
        b"Content-Length: -1",
        b"Content-Length: 3\xa0",
        b"Content-Length: " + b"9" * 4301,
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\xa0",
        b"Transfer-Encoding: gzip",
        b"Connection: close",
        b"Connection: keep-alive",
        b"Expect: 100-continue",
        b"X-Tab:\tvalue\t",
        b"X-Ctl: a\x01b",
        b"X-Null: a\x00b",
        b"X-High: caf\xe9",
        b"Bad Name: x",
        b"NoColon",
        b" folded",
        b": empty name",
        b"Host : spaced",
    ]
)
BODIES = st.sampled_from(
    [
        b"",
        b"abc",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\n0\n\n",
        b"3\r\nabc\n0\r\n\r\n",
        b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
        b"3\r\nabc\r\n0\r\ngarbage\r\n\r\n",
        b"zz\r\n",
        b"\r\n",
    ]
)


@st.composite
def near_valid_requests(draw: st.DrawFn) -> bytes:
    end = draw(LINE_ENDS)
    lines = [draw(REQUEST_LINES), *draw(st.lists(HEADER_LINES, max_size=5))]
    return end.join(lines) + end + end + draw(BODIES)


def _h11_parses(raw: bytes) -> list[tuple[str, str, tuple[tuple[str, str], ...], bytes]]:
    """The complete requests h11 (a server) reads from `raw` before it stops or objects."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=SMALL.max_head)
    conn.receive_data(raw)
    conn.receive_data(b"")
    done: list[tuple[str, str, tuple[tuple[str, str], ...], bytes]] = []
    head: tuple[str, str, tuple[tuple[str, str], ...]] = ("", "", ())
    body = b""
    with contextlib.suppress(h11.RemoteProtocolError):
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                headers = tuple((n.decode(), v.decode("latin-1")) for n, v in event.headers)
                head, body = (event.method.decode(), event.target.decode(), headers), b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                done.append((*head, body))
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
            else:
                break
    return done


@settings(max_examples=400, deadline=None)
@given(raw=st.one_of(near_valid_requests(), HOSTILE), sizes=st.sampled_from([(), (1,), (7, 3)]))
def test_any_input_is_served_as_h11_reads_it_or_refused_and_never_hangs(raw, sizes):
    """h11 is the parser. Whatever the bytes and however they are split, each one either ends as
    requests handed over exactly as h11 reads them, or as a 400 or 413 and a close, or as a
    quiet close: no exception escapes (nothing logged), no other answer, and the connection is
    done as soon as the peer has sent everything and half-closed (no deadline has to end it).
    We may refuse more than h11 (bad percent-encoding, a target not starting with /, limits),
    never accept more or differently."""
    served: list[tuple[str, str, tuple[tuple[str, str], ...], bytes]] = []

    async def record(request: Request) -> Response:
        served.append((request.method, request.target, request.headers, request.body))
        return Response(200)

    async def main() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        received = b""
        with trio.fail_after(SMALL.request_timeout / 2):  # virtual time: well before a deadline
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_http, server, record, SMALL)
                try:
                    if sizes:
                        await RawClient(client).send(raw, sizes)
                    else:
                        await client.send_all(raw)
                    await client.send_eof()
                except trio.BrokenResourceError:
                    pass  # the server closed before all was sent (Connection: close, a 400)
                while chunk := await client.receive_some():
                    received += chunk
                await client.aclose()
        return received

    errors = _Errors()
    logger = logging.getLogger("aemagent.http")
    logger.addHandler(errors)
    try:
        received = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        logger.removeHandler(errors)
    assert not errors.records, errors.records[0].getMessage()
    statuses = _parse_all(received)
    assert set(statuses) <= {100, 200, 400, 413}
    assert served == _h11_parses(raw)[: len(served)]
    assert statuses.count(200) == len(served)


def test_a_header_value_with_a_long_run_of_blanks_parses_in_linear_time():
    """The hand-written parser once stripped a value's blanks in its pattern, which backtracked
    quadratically: one 16 KiB line took 0.8 s of CPU, a way to stall the daemon. h11's patterns
    do this 256 KiB head in milliseconds; the bound only catches a quadratic case (minutes)."""
    limits = Limits(max_head=1 << 20)
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Blank: a" + b" " * (256 * 1024) + b"b\r\nX-T: \t1\t"
    seen: list[Request] = []

    async def record(request: Request) -> Response:
        seen.append(request)
        return Response(200)

    async def main() -> None:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_http, server, record, limits)
            await client.send_all(head + b"\r\n\r\n")
            await client.send_eof()
            while await client.receive_some():
                pass

    start = time.perf_counter()
    trio.run(main)
    assert time.perf_counter() - start < 5
    [request] = seen
    assert request.header("x-blank") == "a" + " " * (256 * 1024) + "b"
    assert request.header("x-t") == "1"
