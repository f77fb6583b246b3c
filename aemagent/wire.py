"""A minimal HTTP/1.1 client over a Unix socket: one request per connection.

aem-token imports this on its hot path, so it uses `_socket` rather than `socket` (which pulls in
enum, selectors and collections, a cost the helper's start-up cannot afford); `errno` is built in,
and `os`, `stat`, `sys` and `time` are loaded at interpreter start anyway. `json` is imported
lazily, by `Reply.json()` only.

Exceptions (defined in aemagent.errors, re-exported here):

    AgentUnreachable   no agent answers at the path: missing file, stale socket (connection
                       refused), not a socket, permission denied, path too long, connect timeout
      UntrustedPeer    something listens at the path, but as another user: not our agent.
                       Nothing was sent (not even the request line: it may carry a secret).
    WireError          something answered, but not with a complete, well-formed HTTP answer in
                       time: garbage, truncated, chunked, larger than MAX_ANSWER, or the read
                       timed out

A caller that misuses the API (a header containing CR/LF, a non-ASCII target) gets ValueError.
"""

import _socket
import errno
import os
import stat
import sys
import time

from aemagent.errors import AgentUnreachable, UntrustedPeer, WireError

__all__ = [
    "MAX_ANSWER",
    "MAX_SOCKET_PATH",
    "AgentUnreachable",
    "Reply",
    "UntrustedPeer",
    "WireError",
    "flat_json",
    "quote",
    "request",
]

# An answer (head and body) larger than this is refused: no agent answer comes near it.
MAX_ANSWER = 4 * 1024 * 1024
# sun_path is 108 bytes on Linux and 104 on macOS and the BSDs, the terminating NUL included:
# the same limits the daemon binds with (unixsocket.MAX_SOCKET_PATH).
MAX_SOCKET_PATH = 107 if sys.platform.startswith("linux") else 103
_RECV_SIZE = 65536


class _ClosedUnanswered(WireError):
    """The connection ended before a single byte of an answer."""


_REFUSED = "it closed the connection unanswered: an agent serves only the user it runs as"


class Reply:
    """One HTTP answer. `headers` has lower-cased names; repeated headers are joined by ", "."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:  # never the body: it may be a token
        return f"<Reply {self.status}, {len(self.body)} bytes>"

    def json(self) -> object:
        """The body parsed as JSON; WireError if it is not JSON."""
        flat = flat_json(self.body)
        if flat is not None:
            return flat
        import json  # expensive to import: only for answers flat_json leaves to it

        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise WireError(f"HTTP {self.status} answer is not JSON") from None


def flat_json(data: bytes) -> dict[str, object] | None:
    """Decode the common answer without `json` (expensive to import: it pulls in `re`, `enum`).

    Handles one JSON object whose keys and values are strings without escapes (printable ASCII),
    integers, booleans or null: every token and error answer of the agent. For anything else it
    returns None and the caller uses `json.loads`; what it does decode, it decodes exactly as
    `json.loads` would (tests/unit/test_wire.py checks this against `json` with hypothesis).
    """
    try:
        s = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    ws = " \t\n\r"
    i, end = len(s) - len(s.lstrip(ws)), len(s.rstrip(ws)) - 1  # `{` and `}`
    if end <= i or s[i] != "{" or s[end] != "}":
        return None
    out: dict[str, object] = {}
    i = _skip(s, i + 1, end)
    while i < end:
        key, i = _flat_string(s, i, end)
        i = _skip(s, i, end)
        if key is None or s[i] != ":":
            return None
        i = _skip(s, i + 1, end)
        value: object
        if s[i] == '"':
            value, i = _flat_string(s, i, end)
            if value is None:
                return None
        else:
            j = i
            while j < end and s[j] not in ", \t\n\r":
                j += 1
            value, i = _flat_scalar(s[i:j]), j
            if value is _NOT_FLAT:
                return None
        out[key] = value
        i = _skip(s, i, end)
        if i < end:
            if s[i] != ",":
                return None
            i = _skip(s, i + 1, end)
            if i == end:  # a trailing comma
                return None
    return out


_NOT_FLAT = object()
_SCALARS: dict[str, object] = {"true": True, "false": False, "null": None}


def _skip(s: str, i: int, end: int) -> int:
    while i < end and s[i] in " \t\n\r":
        i += 1
    return i


def _flat_string(s: str, i: int, end: int) -> tuple[str | None, int]:
    """The string starting at `s[i]` (a quote) and the index after it; None if not plain."""
    if s[i] != '"':
        return None, i
    j = s.find('"', i + 1, end)
    text = s[i + 1 : j]
    if j < 0 or "\\" in text or not text.isprintable():
        return None, i
    return text, j + 1


def _flat_scalar(token: str) -> object:
    if token in _SCALARS:
        return _SCALARS[token]
    digits = token.removeprefix("-")
    if digits.isdigit() and len(digits) <= 18 and (digits == "0" or digits[0] != "0"):
        return int(token)
    return _NOT_FLAT


def request(
    sock_path: str,
    method: str,
    target: str,
    *,
    body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
    connect_timeout: float = 1.0,
    read_timeout: float = 30.0,
) -> Reply:
    """Send one request (`target` is the path and query, already percent-encoded)."""
    data = _encode_request(method, target, body, headers)
    sock = _connect(sock_path, connect_timeout)
    try:
        deadline = time.monotonic() + read_timeout
        try:
            sock.settimeout(read_timeout)
            sock.sendall(data)
            return _read_reply(sock, method, deadline)
        except TimeoutError:
            raise WireError(f"no answer from the agent within {read_timeout:g} s") from None
        except _ClosedUnanswered:
            # The agent closes connections of other users before reading a byte.
            raise AgentUnreachable(sock_path, _REFUSED, permission=True) from None
        except (ConnectionResetError, BrokenPipeError):
            raise AgentUnreachable(sock_path, _REFUSED, permission=True) from None
        except OSError as exc:
            raise WireError(f"talking to the agent: {exc.strerror or exc}") from None
    finally:
        sock.close()


def quote(s: str) -> str:
    """Percent-encode `s` (UTF-8) for a query value: everything but RFC 3986's unreserved."""
    return "".join(
        chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in s.encode("utf-8", "surrogateescape")
    )


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _encode_request(
    method: str,
    target: str,
    body: bytes | None,
    headers: tuple[tuple[str, str], ...] | list[tuple[str, str]],
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: aemagent", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    for line in lines:
        if "\r" in line or "\n" in line or "\0" in line:
            raise ValueError(f"CR, LF or NUL in a request line or header: {line!r}")
    if not method or " " in method or not target or " " in target:
        raise ValueError(f"bad method or target: {method!r} {target!r}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def _connect(path: str, timeout: float) -> _socket.socket:
    """A connection to the agent at `path`, its peer checked: nothing has been sent yet."""
    sock = _connect_any(path, timeout)
    try:
        _check_peer(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_any(path: str, timeout: float) -> _socket.socket:
    size = len(os.fsencode(path))
    if not path or "\0" in path:
        raise AgentUnreachable(path, "not a valid socket path")
    if size > MAX_SOCKET_PATH:
        raise AgentUnreachable(
            path, f"the path is {size} bytes, longer than the OS limit of {MAX_SOCKET_PATH}"
        )
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        deadline = time.monotonic() + timeout
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(path)
                return sock
            except BlockingIOError:
                # EAGAIN: the agent's listen backlog is full (Linux); it is busy, not gone.
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(0.005)
    except TimeoutError:
        sock.close()
        raise AgentUnreachable(path, f"connect timed out after {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        permission = exc.errno in (errno.EACCES, errno.EPERM) or _refused_by_another(path, exc)
        raise AgentUnreachable(path, _reason(path, exc), permission=permission) from None


def _check_peer(sock: _socket.socket, path: str) -> None:
    """UntrustedPeer unless the listening process is us or root.

    The kernel records who called listen(); a socket file's owner and mode say nothing (anyone
    may make a 0666 socket in a directory of their own). Root, who may read any agent's memory
    anyway, talks to the agent of any user it is pointed at, except at root's own default path:
    there, any other user is a squatter.
    """
    try:
        peer = _peer_uid(sock)
    except (OSError, ValueError) as exc:
        detail = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise UntrustedPeer(
            path, f"cannot tell who serves the socket at {path} ({detail}): refusing to talk to it"
        ) from None
    me = os.getuid()
    if peer in (me, os.geteuid(), 0) or (me == 0 and not _is_roots_default(path)):
        return
    raise UntrustedPeer(
        path,
        f"the socket at {path} is served by uid {peer}, not by you (uid {me}):"
        " refusing to talk to it",
        peer,
    )


# struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Linux, SO_PEERCRED)
_UCRED_SIZE = 12
# struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]; }
# (macOS and FreeBSD, LOCAL_PEERCRED at level SOL_LOCAL); XUCRED_VERSION is 0.
_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE = 0, 1, 76


def _peer_uid(sock: _socket.socket) -> int:
    """The effective uid of the process that listens at the other end (no `struct`: its import
    is not free, and this runs on aem-token's hot path)."""
    if sys.platform.startswith("linux"):
        data = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED_SIZE)
        if len(data) < 8:
            raise ValueError(f"SO_PEERCRED gave {len(data)} bytes")
        return int.from_bytes(data[4:8], sys.byteorder)
    if sys.platform == "darwin" or sys.platform.startswith(("freebsd", "dragonfly")):
        return _xucred_uid(sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE))
    raise ValueError(f"no way to read a Unix socket's peer credentials on {sys.platform}")


def _xucred_uid(data: bytes) -> int:
    """`cr_uid` of a struct xucred; ValueError unless it is complete and of version 0."""
    if len(data) < 8:
        raise ValueError(f"LOCAL_PEERCRED gave {len(data)} bytes")
    version = int.from_bytes(data[0:4], sys.byteorder)
    if version != 0:
        raise ValueError(f"LOCAL_PEERCRED gave a struct xucred of version {version}, not 0")
    return int.from_bytes(data[4:8], sys.byteorder)


def _is_roots_default(path: str) -> bool:
    """Whether `path` lies in a directory root's own default socket path would use."""
    from aemagent import paths  # only root talking to another user's socket gets here

    try:
        where = os.stat(path.rpartition("/")[0] or ("/" if path.startswith("/") else "."))
    except OSError:
        return True  # cannot tell: assume the worst
    for candidate in (
        paths.default_socket_path(),
        # the /tmp fallback, wherever it applies
        paths.default_socket_path(platform="linux", environ={}, run_user_base="/nonexistent"),
    ):
        try:
            st = os.stat(candidate.rpartition("/")[0])
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (where.st_dev, where.st_ino):
            return True
    return False


_REASONS = {
    errno.ENOENT: "no such file",
    errno.ECONNREFUSED: "connection refused: a stale socket",
    errno.ENOTSOCK: "not a socket",
    errno.EPROTOTYPE: "not a stream socket",
    errno.ENOTDIR: "a parent is not a directory",
}


def _reason(path: str, exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        # Name the owner and mode: usually another user's socket or directory.
        parent = path.rpartition("/")[0] or ("/" if path.startswith("/") else ".")
        for where in (path, parent):
            try:
                st = os.stat(where)
            except OSError:
                continue
            what = "" if where == path else f" on {where}"
            return f"permission denied{what}: owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}"
        return "permission denied"
    if exc.errno == errno.ECONNREFUSED and not _is_socket(path):
        return "not a socket"  # Linux refuses connections to a regular file, too
    if exc.errno == errno.ECONNREFUSED and sys.platform == "darwin":
        # macOS refuses when the listen backlog is full, too (Linux says EAGAIN, retried above):
        # a busy agent, or a stale socket; nothing tells the two apart without a second try.
        owner = _owner(path)
        if owner is None or owner == os.getuid():
            return "connection refused: the agent is busy or gone"
        return f"connection refused: a socket of uid {owner}, busy or gone"
    return _REASONS.get(exc.errno or 0) or exc.strerror or str(exc)


def _refused_by_another(path: str, exc: OSError) -> bool:
    """macOS: refused by another user's socket; not ours, so `aemagent start` is no fix."""
    if exc.errno != errno.ECONNREFUSED or sys.platform != "darwin" or os.getuid() == 0:
        return False
    owner = _owner(path)
    return owner is not None and owner != os.getuid()


def _owner(path: str) -> int | None:
    try:
        return os.stat(path).st_uid
    except OSError:
        return None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _read_reply(sock: _socket.socket, method: str, deadline: float) -> Reply:
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if not _fill(sock, deadline, buf):
            if not buf:
                raise _ClosedUnanswered("the connection closed unanswered")
            raise WireError("the agent's answer ends inside its header")
    status, headers = _parse_head(bytes(buf[:end]))
    start = end + 4
    if method == "HEAD" or status in (204, 304):
        return Reply(status, headers, b"")
    encoding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if encoding is not None:
        # The agent always sends Content-Length (daemon/httpserver.py writes its own answers):
        # a chunked answer, or any other transfer-coding, comes from something else.
        raise WireError(f"unsupported transfer-encoding: {encoding[:40]!r}")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise WireError(f"bad content-length: {length[:40]!r}")
        n = int(length)
        if start + n > MAX_ANSWER:
            raise WireError(_TOO_LARGE)
        while len(buf) < start + n:
            if not _fill(sock, deadline, buf):
                raise WireError(f"the agent's answer is truncated: {len(buf) - start} of {n} bytes")
        return Reply(status, headers, bytes(buf[start : start + n]))
    while _fill(sock, deadline, buf):  # no length: the body runs to EOF
        pass
    return Reply(status, headers, bytes(buf[start:]))


_TOO_LARGE = f"the agent's answer is larger than {MAX_ANSWER // 1048576} MiB"


def _fill(sock: _socket.socket, deadline: float, buf: bytearray) -> bool:
    """Append what arrives next to `buf`; False at EOF."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
    chunk = sock.recv(_RECV_SIZE)
    if not chunk:
        return False
    buf += chunk
    if len(buf) > MAX_ANSWER:
        raise WireError(_TOO_LARGE)
    return True


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if (
        len(parts) < 2
        or parts[0] not in ("HTTP/1.1", "HTTP/1.0")
        or not (len(parts[1]) == 3 and parts[1].isascii() and parts[1].isdigit())
        or parts[1][0] not in "2345"
    ):
        raise WireError(f"not an HTTP answer: {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or not name.isascii():
            raise WireError(f"malformed header line in the agent's answer: {line[:60]!r}")
        name = name.lower()
        value = value.strip(" \t")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return int(parts[1]), headers
