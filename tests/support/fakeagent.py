"""A fake aemagent for the client tests: a threaded Unix-socket HTTP server with canned answers.

The server is standard library only, so it also runs standalone (for benchmarks):

    python tests/support/fakeagent.py /tmp/x/agent.sock [TOKEN]

It records every request (`FakeAgent.requests`) and answers each with a `Canned` answer, or with
what a function of the request returns. A `Canned` with `raw` set sends those bytes verbatim, to
feed the client garbage, truncated or oversized answers. `FakeProfiles` is such a function that
behaves like the agent's token and forced-refresh endpoints, for the git and Python clients; it
chooses profiles with the agent's own `ProfileTable` (imported when one is made).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from aemagent.core.profiles import Profile


@dataclass
class Recorded:
    """One request as the fake agent received it."""

    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    request_line: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Canned:
    """One answer. `raw` (bytes sent verbatim, then close) overrides everything else."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    raw: bytes | None = None
    delay: float = 0.0  # seconds before answering; cut short by FakeAgent.close()
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        head = [f"HTTP/1.1 {self.status} X", f"Content-Type: {self.content_type}"]
        head += [f"Content-Length: {len(self.body)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in self.headers]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


Answer = Canned | Callable[[Recorded], Canned]


def json_answer(status: int, obj: object) -> Canned:
    return Canned(status, json.dumps(obj).encode())


def error(status: int, code: str, message: str) -> Canned:
    return json_answer(status, {"error": code, "message": message})


def token_answer(token: str = "eyJ.tok.en", **extra: object) -> Callable[[Recorded], Canned]:
    """Like the real agent's /v1/token: the bare token for `Accept: text/plain`, else JSON."""

    def answer(request: Recorded) -> Canned:
        if request.header("accept") == "text/plain":
            return Canned(200, token.encode(), "text/plain; charset=utf-8")
        info: dict[str, object] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_at": 1_900_000_000,
            "expires_in": 86_000,
            "profile": "p123-e1234",
        }
        info.update(extra)
        return json_answer(200, info)

    return answer


@dataclass
class FakeProfile:
    """One profile of `FakeProfiles`; `token` changes on every refresh.

    `hosts` are the patterns given with --host, `derived` those the credential implies."""

    name: str
    hosts: tuple[str, ...] = ()
    token: str = "eyJ.tok.en"
    account: str | None = None
    client_id: str | None = None
    org_id: str | None = None
    expires_at: int = 1_900_000_000
    refreshes: int = 0
    forced_at: float | None = None
    default: bool = False
    derived: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class _Credential:
    """A `FakeProfile` as the agent's `Credential` protocol, for its `ProfileTable`."""

    profile: FakeProfile
    kind = "service"
    refreshable = True
    certificate_expires_at = None

    @property
    def client_id(self) -> str:
        return self.profile.client_id or ""

    @property
    def org_id(self) -> str | None:
        return self.profile.org_id

    @property
    def technical_account_id(self) -> str | None:
        return self.profile.account

    @property
    def digest(self) -> str:
        return f"fake-{self.profile.name}"

    def default_name(self) -> str:
        return self.profile.name

    def derived_hosts(self) -> tuple[str, ...]:
        return self.profile.derived


class FakeProfiles:
    """The agent's `GET /v1/token` and `POST /v1/profiles/{name}/refresh`, in memory.

    The profile is chosen by the agent's own `ProfileTable`: by name, else by the url's host
    (--host patterns before derived ones), else the default or the only profile, with the
    agent's errors. A refresh with `{"if_current": sha256}` happens only if that is the current
    token and no forced refresh happened in the last `FORCED_INTERVAL` seconds.
    """

    FORCED_INTERVAL = 60.0

    def __init__(self, *profiles: FakeProfile) -> None:
        from aemagent.core.policy import PolicySettings, Schedule
        from aemagent.core.profiles import Profile, ProfileTable

        self.profiles = {p.name: p for p in profiles}
        self.table = ProfileTable()
        for generation, fake in enumerate(profiles, 1):
            profile = Profile(
                name=fake.name,
                credential=_Credential(fake),
                generation=generation,
                schedule=Schedule(PolicySettings(), refreshable=True),
                hosts=fake.hosts,
            )
            self.table.put(profile, default=fake.default)
        self.clock = time.monotonic
        self._lock = threading.Lock()  # requests are served on threads; the table is not shared

    def __call__(self, request: Recorded) -> Canned:
        path, _, query = request.target.partition("?")
        params = dict(urllib.parse.parse_qsl(query))
        parts = path.split("/")
        with self._lock:
            if request.method == "GET" and path == "/v1/token":
                return self._token(request, params)
            refresh = (
                len(parts) == 5 and parts[:3] == ["", "v1", "profiles"] and parts[4] == "refresh"
            )
            if request.method == "POST" and refresh:
                return self._refresh(urllib.parse.unquote(parts[3]), request.body)
        return error(404, "not_found", f"no such endpoint: {path}")

    def _resolve(self, name: str | None = None, url: str | None = None) -> FakeProfile | Canned:
        """As the agent resolves, and answers its errors as the agent's API does."""
        from aemagent.errors import AemAgentError

        try:
            profile: Profile = self.table.resolve(name, url)
        except AemAgentError as exc:
            return error(exc.status, exc.code, str(exc))
        return self.profiles[profile.name]

    def _choose(self, params: dict[str, str]) -> FakeProfile | Canned:
        return self._resolve(params.get("profile") or None, params.get("url") or None)

    def _token(self, request: Recorded, params: dict[str, str]) -> Canned:
        profile = self._choose(params)
        if isinstance(profile, Canned):
            return profile
        if request.header("accept") == "text/plain":
            return Canned(200, profile.token.encode(), "text/plain; charset=utf-8")
        return json_answer(
            200,
            {
                "access_token": profile.token,
                "token_type": "Bearer",
                "expires_at": profile.expires_at,
                "expires_in": 86_000,
                "profile": profile.name,
                "client_id": profile.client_id,
                "org_id": profile.org_id,
                "account": profile.account,
            },
        )

    def _refresh(self, name: str, body: bytes) -> Canned:
        profile = self._resolve(name)
        if isinstance(profile, Canned):
            return profile
        refresh = True
        if body:
            held = json.loads(body)["if_current"]
            now = self.clock()
            current = hashlib.sha256(profile.token.encode()).hexdigest()
            recent = (
                profile.forced_at is not None and now - profile.forced_at < self.FORCED_INTERVAL
            )
            refresh = held == current and not recent
            if refresh:
                profile.forced_at = now
        if refresh:
            profile.refreshes += 1
            profile.token = f"{profile.token.split('~')[0]}~{profile.refreshes}"
        return json_answer(200, {"name": profile.name, "state": "valid", "refreshed": refresh})


@contextlib.contextmanager
def short_socket_dir() -> Iterator[str]:
    """A fresh directory with a short path: pytest's tmp_path can exceed sun_path's 108 bytes."""
    path = tempfile.mkdtemp(prefix="aemt", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FakeAgent:
    """Serves `answer` on a Unix socket at `path` from a thread until closed."""

    def __init__(self, path: str, answer: Answer | None = None) -> None:
        self.path = path
        self.answer: Answer = answer if answer is not None else token_answer()
        self.requests: list[Recorded] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocking accept() on Linux
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:
            wake.connect(self.path)  # and elsewhere
        self._acceptor.join(5)
        self._listener.close()
        for thread in self._threads:
            thread.join(5)
        Path(self.path).unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self._stopping.is_set():
                conn.close()
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                request = _read_request(conn)
            except (OSError, ValueError):
                return
            self.requests.append(request)
            canned = self.answer(request) if callable(self.answer) else self.answer
            if canned.delay and self._stopping.wait(canned.delay):
                return
            with contextlib.suppress(OSError):
                conn.sendall(canned.encode())
                conn.shutdown(socket.SHUT_WR)


def _read_request(conn: socket.socket) -> Recorded:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("EOF in request head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("EOF in request body")
        body += chunk
    return Recorded(method, target, headers, body, lines[0])


def _main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python tests/support/fakeagent.py SOCKET_PATH [TOKEN]", file=sys.stderr)
        return 64
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with FakeAgent(argv[0], token_answer(*argv[1:])):
        print(f"fake agent serving on {argv[0]}; Ctrl-C stops it", file=sys.stderr)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
