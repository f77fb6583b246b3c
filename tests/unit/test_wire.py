import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from fakeagent import Canned, FakeAgent, json_answer, short_socket_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from aemagent import wire


@pytest.fixture
def sock_path():
    with short_socket_dir() as directory:
        yield directory + "/agent.sock"


@pytest.fixture
def agent(sock_path):
    with FakeAgent(sock_path, json_answer(200, {"status": "ok"})) as fake:
        yield fake


def raw(agent, data):
    agent.answer = Canned(raw=data)
    return wire.request(agent.path, "GET", "/v1/health")


# --- requests ----------------------------------------------------------------------------------


def test_get_sends_host_and_connection_close(agent):
    reply = wire.request(agent.path, "GET", "/v1/health?x=1", headers=[("Accept", "a/b")])
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}
    assert reply.headers["content-type"] == "application/json"
    (request,) = agent.requests
    assert request.request_line == "GET /v1/health?x=1 HTTP/1.1"
    assert request.headers == {"host": "aemagent", "connection": "close", "accept": "a/b"}
    assert request.body == b""


def test_post_sends_the_body_with_its_length(agent):
    wire.request(agent.path, "POST", "/v1/profiles", body=b'{"a": 1}')
    (request,) = agent.requests
    assert request.header("content-length") == "8"
    assert request.body == b'{"a": 1}'


def test_empty_body_still_sends_content_length(agent):
    wire.request(agent.path, "POST", "/v1/shutdown", body=b"")
    assert agent.requests[0].header("content-length") == "0"


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/a b", ()),
        ("GET", "", ()),
        ("G T", "/", ()),
        ("GET", "/\r\nX: y", ()),
        ("GET", "/", (("X", "a\r\nEvil: 1"),)),
        ("GET", "/", (("X\n", "a"),)),
        ("GET", "/é", ()),
    ],
)
def test_misuse_is_a_value_error_before_connecting(method, target, headers):
    with pytest.raises(ValueError):
        wire.request("/nonexistent/agent.sock", method, target, headers=headers)


def test_reply_repr_never_shows_the_body():
    reply = wire.Reply(200, {}, b"secret-token")
    assert "secret" not in repr(reply)
    assert "12 bytes" in repr(reply)


# --- answers -----------------------------------------------------------------------------------


def test_headers_are_lower_cased_and_repeats_joined(agent):
    reply = raw(agent, b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a:2\r\nContent-Length: 2\r\n\r\nhi")
    assert reply.headers == {"x-a": "1, 2", "content-length": "2"}
    assert reply.body == b"hi"


def test_body_without_length_runs_to_eof(agent):
    assert raw(agent, b"HTTP/1.0 200 OK\r\n\r\nall of it").body == b"all of it"


def test_extra_bytes_after_content_length_are_ignored(agent):
    assert raw(agent, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi there").body == b"hi"


def test_no_body_for_204(agent):
    assert raw(agent, b"HTTP/1.1 204 No Content\r\n\r\n").body == b""


@pytest.mark.parametrize(
    "body",
    [
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nTrailer: x\r\n\r\n",
        b"3\r\nabc\r\n0\r\n\r\n",
        b"",
    ],
)
def test_a_chunked_answer_is_refused(agent, body):
    """The agent always answers with Content-Length: a chunked answer is not the agent's."""
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    with pytest.raises(wire.WireError, match="unsupported transfer-encoding: 'chunked'"):
        raw(agent, data)


@pytest.mark.parametrize("body", [b"<html>", b"\xff", b"[" * 100_000])
def test_non_json_reply_json_is_a_wire_error(body):
    with pytest.raises(wire.WireError, match="not JSON"):
        wire.Reply(200, {}, body).json()


@pytest.mark.parametrize(
    "data",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nName : x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    ],
)
def test_garbage_is_a_wire_error(agent, data):
    with pytest.raises(wire.WireError):
        raw(agent, data)


def test_a_connection_closed_unanswered_means_not_our_agent(agent):
    """The agent closes other users' connections before reading: exit 2, with the reason."""
    with pytest.raises(wire.AgentUnreachable, match="serves only the user it runs as") as info:
        raw(agent, b"")
    assert info.value.permission


def test_truncated_body_is_a_wire_error(agent):
    with pytest.raises(wire.WireError, match="truncated: 5 of 10 bytes"):
        raw(agent, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")


def test_oversized_content_length_is_refused_without_reading(agent):
    with pytest.raises(wire.WireError, match="larger than 4 MiB"):
        raw(agent, b"HTTP/1.1 200 OK\r\nContent-Length: 4194304\r\n\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: ",  # a head that never ends
    ],
)
def test_oversized_answer_is_a_wire_error(agent, head):
    with pytest.raises(wire.WireError, match="larger than 4 MiB"):
        raw(agent, head + b"x" * (wire.MAX_ANSWER + 1))


def test_exactly_the_cap_is_accepted(agent):
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    assert len(raw(agent, head + b"x" * (wire.MAX_ANSWER - len(head))).body) == 4194285


def test_read_timeout_is_a_wire_error(agent):
    agent.answer = Canned(200, b"late", delay=10)
    started = time.monotonic()
    with pytest.raises(wire.WireError, match=r"no answer from the agent within 0\.2 s"):
        wire.request(agent.path, "GET", "/", read_timeout=0.2)
    assert time.monotonic() - started < 2


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=300)
    | st.builds(bytes.__add__, st.just(b"HTTP/1.1 200 OK\r\n"), st.binary(max_size=300))
)
def test_any_answer_parses_or_is_a_wire_error(data):
    # h11's fuzz invariant: arbitrary bytes give a Reply or WireError, never anything else.
    ours, theirs = socket.socketpair(socket.AF_UNIX)
    with ours, theirs:
        theirs.sendall(data)
        theirs.close()
        try:
            reply = wire._read_reply(ours, "GET", time.monotonic() + 5)
        except wire.WireError:
            return
        assert 200 <= reply.status < 600


# --- no agent ----------------------------------------------------------------------------------


def unreachable(path, **kwargs):
    started = time.monotonic()
    with pytest.raises(wire.AgentUnreachable) as info:
        wire.request(path, "GET", "/v1/health", **kwargs)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"no agent at {path} (")
    return info.value


def test_missing_socket(sock_path):
    assert unreachable(sock_path).reason == "no such file"


def test_stale_socket_bound_but_not_listening(sock_path):
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(sock_path)
        assert "connection refused" in unreachable(sock_path).reason


def test_stale_socket_file_left_behind(sock_path):
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(sock_path)
        dead.listen()
    assert Path(sock_path).exists()
    assert "stale socket" in unreachable(sock_path).reason


def test_regular_file_is_not_an_agent(sock_path):
    Path(sock_path).write_text("")
    assert unreachable(sock_path).reason == "not a socket"


def test_parent_is_a_file(sock_path):
    Path(sock_path).write_text("")
    assert unreachable(sock_path + "/agent.sock").reason == "a parent is not a directory"


def test_path_too_long():
    path = "/tmp/" + "x" * 200
    error = unreachable(path)
    assert (
        error.reason == f"the path is 205 bytes, longer than the OS limit of {wire.MAX_SOCKET_PATH}"
    )


@pytest.mark.parametrize("path", ["", "/tmp/a\0b"])
def test_invalid_path(path):
    assert unreachable(path).reason == "not a valid socket path"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux answers EAGAIN to a full backlog")
def test_connect_timeout_when_the_backlog_is_full(sock_path):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sock_path)
        listener.listen(0)
        waiting = []
        try:
            for _ in range(10):  # fill the backlog
                client = socket.socket(socket.AF_UNIX)
                client.setblocking(False)
                try:
                    client.connect(sock_path)
                except BlockingIOError:
                    client.close()
                    break
                waiting.append(client)
            error = unreachable(sock_path, connect_timeout=0.2)
            assert error.reason == "connect timed out after 0.2 s"
        finally:
            for client in waiting:
                client.close()


@contextlib.contextmanager
def as_another_user():
    """Root is never denied: drop to `nobody` for the block (no threads may run meanwhile)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_permission_denied_on_the_directory(sock_path):
    directory = Path(sock_path).parent
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sock_path)
        listener.listen()
        directory.chmod(0o700 if os.geteuid() == 0 else 0o000)
        try:
            with as_another_user():
                error = unreachable(sock_path)
        finally:
            directory.chmod(0o700)
    assert error.permission
    assert error.reason.startswith(f"permission denied on {directory}: owner uid {os.getuid()}")


def test_permission_denied_on_the_socket(sock_path):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(sock_path)
        listener.listen()
        Path(sock_path).parent.chmod(0o755)
        Path(sock_path).chmod(0o600 if os.geteuid() == 0 else 0o000)
        with as_another_user():
            error = unreachable(sock_path)
    assert error.permission
    assert error.reason.startswith(f"permission denied: owner uid {os.getuid()}, mode 0")


def test_permission_denied_names_owner_and_mode(sock_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(sock_path)
        Path(sock_path).chmod(0o600)
        reason = wire._reason(sock_path, PermissionError(errno.EACCES, "denied"))
    assert reason == f"permission denied: owner uid {os.getuid()}, mode 0600"
    missing = sock_path + ".gone/agent.sock"
    reason = wire._reason(missing, PermissionError(errno.EACCES, "denied"))
    assert reason == "permission denied"
    directory = str(Path(sock_path).parent)
    reason = wire._reason(directory + "/x", PermissionError(errno.EACCES, "denied"))
    assert reason.startswith(f"permission denied on {directory}: owner uid {os.getuid()}")


def test_other_errors_use_strerror():
    assert wire._reason("/x", OSError(errno.EIO, "I/O error")) == "I/O error"


# --- quote -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("p123-e1234_a.b~c", "p123-e1234_a.b~c"),
        ("a b", "a%20b"),
        (
            "https://author-p1-e2.adobeaemcloud.com/x?y=1&z=2#f",
            ("https%3A%2F%2Fauthor-p1-e2.adobeaemcloud.com%2Fx%3Fy%3D1%26z%3D2%23f"),
        ),
        ("+%", "%2B%25"),
        ("é", "%C3%A9"),
        ("\udcff", "%FF"),  # an undecodable byte from argv (surrogateescape)
        ("", ""),
    ],
)
def test_quote(value, quoted):
    assert wire.quote(value) == quoted


# --- flat_json ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{}", {}),
        (b" \r\n{ }\t", {}),
        (b'{"a":"b"}', {"a": "b"}),
        (b'{"a": 1, "b": -2, "c": 0, "d": true, "e": false, "f": null, "g": ""}', {
            "a": 1, "b": -2, "c": 0, "d": True, "e": False, "f": None, "g": ""
        }),
        (b'{"a":1,"a":2}', {"a": 2}),  # the last one wins, as with json.loads
        (b'{"error": "not_found", "message": "no profile \'x\'; known: a, b"}', {
            "error": "not_found", "message": "no profile 'x'; known: a, b"
        }),
    ],
)  # fmt: skip
def test_flat_json_decodes(data, expected):
    assert wire.flat_json(data) == expected
    assert json.loads(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":"\\"q\\""}',  # escapes: left to json
        b'{"a":"\xc3\xa9"}',  # non-ASCII
        b'{"a":1.5}',  # floats
        b'{"a":1e3}',
        b'{"a":[1]}',
        b'{"a":{"b":1}}',
        b'{"a":01}',
        b'{"a":1,}',
        b'{"a" 1}',
        b'{"a":1 "b":2}',
        b'{"a":}',
        b"{a:1}",
        b'{"a":tru}',
        b'{"a":"b}',
        b'{"a\tb":1}',
        b"[1]",
        b'"x"',
        b"{",
        b"",
        b'{"a":1}}',
        b'{"a":12345678901234567890}',
    ],
)
def test_flat_json_leaves_the_rest_to_json(data):
    assert wire.flat_json(data) is None


flat_values = st.one_of(
    st.text(),
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.none()),
)


@settings(max_examples=500, deadline=None)
@given(
    st.dictionaries(st.text(), flat_values, max_size=5),
    st.sampled_from([None, 0, 2]),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
)
def test_flat_json_agrees_with_json_on_objects(obj, indent, separators):
    data = json.dumps(obj, indent=indent, separators=separators).encode()
    flat = wire.flat_json(data)
    assert flat is None or flat == json.loads(data)


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=80)
    | st.text(alphabet='{}":, \t\n1-0aetrufnl\\', max_size=40).map(str.encode)
)
def test_flat_json_never_accepts_what_json_rejects(data):
    flat = wire.flat_json(data)
    if flat is not None:
        assert flat == json.loads(data)


def test_reply_json_uses_json_for_the_rest():
    assert wire.Reply(200, {}, b'{"a": [1, {"b": "\\u00e9"}]}').json() == {"a": [1, {"b": "é"}]}
