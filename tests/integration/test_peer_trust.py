"""Clients talk only to an agent run by their own user (or root): the socket-squatting attack.

Where the default socket path falls back to `/tmp/aemagent-<uid>/agent.sock` (Linux without
XDG_RUNTIME_DIR and without a private /run/user/<uid>; macOS when its per-user temp path is too
long), another local user can create that directory first, open it (0711) and listen on a 0666
socket there. Every client connects through `wire._connect`, which reads the listener's uid from
the kernel (SO_PEERCRED; LOCAL_PEERCRED on macOS) and refuses before sending a byte.

Here the squatter is uid 65534 (nobody), the victim a uid of its own without a passwd entry, both
run with setpriv (procs.python_as); the squatter records every byte it receives and answers like
an agent (health with its pid, a fake token for everything else).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest

from aemagent import paths, wire

NOBODY = 65534
SECRET = "p8e-SQUATTED-client-secret-7c1f"
AEM_HOST = "author-p1-e2.adobeaemcloud.com"

linux_as_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs Linux (SO_PEERCRED), root and setpriv to run processes as other users",
)

# The squatter: creates its directory (0711) and a 0666 socket, records each connection's bytes
# as one JSON line, answers like an agent. A connection sending exactly SYNC is answered
# "synced" and not recorded: connections are served in order, so when it returns, every
# earlier connection has been recorded.
SQUATTER = r"""
import json, os, socket, sys
directory, path, record = sys.argv[1:4]
try:
    os.mkdir(directory, 0o711)
except FileExistsError:
    pass
os.chmod(directory, 0o711)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o666)
s.listen(16)
info = {
    "status": "ok", "pid": os.getpid(), "name": "p1-e2", "kind": "oauth_server_to_server",
    "client_id": "squatter", "access_token": "squatter-token", "token_type": "Bearer",
    "expires_at": 1900000000, "expires_in": 3600, "profile": "p1-e2",
    "account": "squatter@techacct.adobe.com", "profiles": [],
}
body = json.dumps(info).encode()
reply = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + b"Content-Length: %d\r\n\r\n" % len(body) + body
)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    data = b""
    with conn:
        conn.settimeout(10)
        try:
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    if len(rest) >= length:
                        break
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if data == b"SYNC\r\n\r\n":
                conn.sendall(b"synced")
                continue
            if data:
                conn.sendall(reply)
        except OSError:
            pass
    with open(record, "a") as f:
        f.write(json.dumps(data.decode("latin-1")) + "\n")
"""


@dataclass
class Squatter:
    path: str
    record: Path

    def received(self) -> list[str]:
        """What each connection so far sent, one string per connection, after a sync."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(procs.STEP_TIMEOUT)
            s.connect(self.path)
            s.sendall(b"SYNC\r\n\r\n")
            assert s.recv(16) == b"synced"
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@contextlib.contextmanager
def squatting(user: procs.UserPython, directory: str, record_dir: Path) -> Iterator[Squatter]:
    path = f"{directory}/{paths.SOCKET_NAME}"
    record = record_dir / "received.jsonl"
    proc = subprocess.Popen(
        user.argv("-c", SQUATTER, directory, path, str(record)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=procs.base_env(**user.env),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"listening\n", "the squatter did not start"
        st = os.stat(directory)
        assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o711)
        yield Squatter(path, record)
    finally:
        procs._stop(proc)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Victim:
    uid: int
    python: procs.UserPython
    home: Path
    env: dict[str, str]
    credential: Path

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return procs.run(
            self.python.argv(*args), self.env, stdin=None if stdin is None else stdin.encode()
        )


def _free_uid() -> int:
    """A uid with no passwd entry, no /run/user dir and no /tmp/aemagent-<uid> dir yet."""
    rng = random.SystemRandom()
    while True:
        uid = rng.randrange(200_000, 900_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if not any(os.path.lexists(p) for p in (f"/run/user/{uid}", f"/tmp/aemagent-{uid}")):
                return uid


@pytest.fixture(scope="module")
def nobody() -> procs.UserPython:
    if not sys.platform.startswith("linux") or os.getuid() != 0:
        pytest.skip("running processes as other users needs root (and SO_PEERCRED, Linux)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        gid = pwd.getpwuid(NOBODY).pw_gid
    except KeyError:
        pytest.skip(f"no user with uid {NOBODY}")
    user = procs.python_as(NOBODY, gid)
    if user is None:
        pytest.skip(f"no Python that uid {NOBODY} can run with aemagent importable")
    return user


@pytest.fixture
def base() -> Iterator[Path]:
    """A short directory both test users can traverse (0711), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="aemt-"))
    os.chmod(directory, 0o711)
    try:
        yield directory
    finally:
        procs.kill_agents(str(directory))
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def victim(base: Path, nobody: procs.UserPython) -> Victim:
    uid = _free_uid()
    python = procs.python_as(uid, uid)
    if python is None:
        pytest.skip(f"no Python that uid {uid} can run with aemagent importable")
    home = base / "home"
    home.mkdir(mode=0o700)
    credential = home / "credential.json"
    credential.write_text(
        json.dumps(
            {
                "CLIENT_ID": "0123456789abcdef0123456789abcdef",
                "CLIENT_SECRETS": [SECRET],
                "ORG_ID": "0123456789ABCDEF01234567@AdobeOrg",
                "SCOPES": ["openid", "AdobeID"],
            }
        )
    )
    credential.chmod(0o600)
    for p in (home, credential):
        os.chown(p, uid, uid)
    env = procs.base_env(**python.env, HOME=str(home))
    for name in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CONFIG_HOME"):
        env.pop(name, None)
    return Victim(uid, python, home, env, credential)


@pytest.fixture(params=["default", "explicit"])
def squatter(
    request: pytest.FixtureRequest, base: Path, nobody: procs.UserPython, victim: Victim
) -> Iterator[Squatter]:
    """`default`: the squatter owns `/tmp/aemagent-<victim uid>/`, where the victim's default
    path falls back to without XDG_RUNTIME_DIR; `explicit`: the victim's $AEMAGENT_SOCK points
    into a directory of the squatter's."""
    record_dir = base / "record"
    record_dir.mkdir(mode=0o700)
    os.chown(record_dir, NOBODY, NOBODY)
    if request.param == "default":
        directory = f"/tmp/aemagent-{victim.uid}"
        # What the victim's clients compute: no XDG_RUNTIME_DIR, no /run/user/<uid>.
        expected = paths.default_socket_path(uid=victim.uid, environ={}, platform="linux")
        assert expected == f"{directory}/{paths.SOCKET_NAME}"
    else:
        squat_parent = base / "theirs"
        squat_parent.mkdir(mode=0o755)
        os.chown(squat_parent, NOBODY, NOBODY)
        directory = str(squat_parent / "aemagent")
        victim.env["AEMAGENT_SOCK"] = f"{directory}/{paths.SOCKET_NAME}"
    with squatting(nobody, directory, record_dir) as squat:
        yield squat


def refusal(squat: Squatter, victim: Victim) -> str:
    return (
        f"the socket at {squat.path} is served by uid {NOBODY}, not by you (uid {victim.uid}):"
        " refusing to talk to it; point $AEMAGENT_SOCK or --socket at your own agent"
    )


def assert_nothing_sent(squat: Squatter) -> None:
    received = squat.received()
    assert received, "the client never connected: the test proves nothing"
    assert not any(SECRET in data for data in received)
    assert received == [""] * len(received), "the squatter received bytes"


# ---- the clients, each refusing the squatter before sending a byte


@linux_as_root
def test_add_sends_no_secret_to_a_squatter(squatter: Squatter, victim: Victim) -> None:
    """Broken (no `_check_peer` in `wire._connect`): the squatter receives the client secret
    and `add` goes on as if it had been added."""
    done = victim.run("-m", "aemagent", "add", str(victim.credential))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"aemagent: {refusal(squatter, victim)}\n"
    assert_nothing_sent(squatter)


@linux_as_root
def test_aem_token_refuses_the_squatter(squatter: Squatter, victim: Victim) -> None:
    """Broken: aem-token prints the squatter's token and exits 0."""
    for fmt in ("token", "json"):
        done = victim.run("-m", "aemagent.helper", "--format", fmt)
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == f"aem-token: {refusal(squatter, victim)}\n"
    assert_nothing_sent(squatter)


@linux_as_root
def test_git_mode_gives_git_nothing_from_the_squatter(squatter: Squatter, victim: Victim) -> None:
    """For an AEM host: one line on stderr, nothing on stdout; any other host: quiet, as when no
    agent answers. Broken: git gets the squatter's username and password."""
    ask = f"protocol=https\nhost={AEM_HOST}\n\n"
    done = victim.run("-m", "aemagent.helper", "get", stdin=ask)
    assert done.stdout == ""
    assert refusal(squatter, victim) in done.stderr
    assert done.stderr.count("\n") == 1
    done = victim.run("-m", "aemagent.helper", "get", stdin="protocol=https\nhost=github.com\n\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert_nothing_sent(squatter)


CLIENT_PROBE = """
import sys, httpx
from aemagent import client
from aemagent.httpx_auth import AemAgentAuth
sock = sys.argv[1] or None
try:
    token = client.get_token(url="https://author-p1-e2.adobeaemcloud.com/", socket=sock)
    print("token", token.access_token)
except client.AgentNotRunning as exc:
    print("AgentNotRunning", exc.exit_code, exc)
try:
    # No network: a transport that echoes the Authorization it was given.
    echo = httpx.MockTransport(lambda r: httpx.Response(200, text=r.headers["authorization"]))
    with httpx.Client(auth=AemAgentAuth(socket=sock), transport=echo) as http:
        print("sent", http.get("https://author-p1-e2.adobeaemcloud.com/").text)
except client.AgentNotRunning as exc:
    print("AgentNotRunning", exc.exit_code, exc)
"""


@linux_as_root
def test_python_clients_raise_agent_not_running(squatter: Squatter, victim: Victim) -> None:
    """`aemagent.client` and `aemagent.httpx_auth`, with the socket given explicitly and by
    default. Broken: `get_token` returns the squatter's token."""
    explicit = victim.run("-c", CLIENT_PROBE, squatter.path)
    implicit = victim.run("-c", CLIENT_PROBE, "")
    line = f"AgentNotRunning 2 {refusal(squatter, victim)}\n"
    for done in (explicit, implicit):
        assert (done.returncode, done.stdout) == (0, line * 2), done.stderr
    assert_nothing_sent(squatter)


@linux_as_root
def test_start_does_not_hand_out_the_squatter(squatter: Squatter, victim: Victim) -> None:
    """`aemagent start` sees no agent of ours, tries to start one, and the socket directory
    (the squatter's) stops it with one line; no eval lines, no daemon. Broken: it prints
    `AEMAGENT_SOCK=<the squatter's path>; AEMAGENT_PID=<its pid>` and exits 0."""
    done = victim.run("-m", "aemagent", "start")
    assert (done.returncode != 0, done.stdout) == (True, "")
    directory = squatter.path.rpartition("/")[0]
    # Today: "socket directory DIR belongs to nobody (uid 65534), not to uid N (mode 0711); …"
    assert done.stderr.startswith("aemagent: ")
    assert done.stderr.count("\n") == 1
    assert directory in done.stderr
    assert f"uid {NOBODY}" in done.stderr
    assert procs.agent_pids(directory) == []
    assert_nothing_sent(squatter)


# ---- root: served by any agent it is pointed at, but never by a squatter at its own path


@linux_as_root
def test_root_refuses_another_user_at_its_own_default_path(
    base: Path, nobody: procs.UserPython, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root's default path here is $XDG_RUNTIME_DIR/aemagent/agent.sock, squatted by nobody;
    the same squatter at a path root was pointed at is served (root may talk to any user's
    agent, as the daemon serves root). Broken: root gets the squatter's token at its own path."""
    record_dir = base / "record"
    record_dir.mkdir(mode=0o700)
    os.chown(record_dir, NOBODY, NOBODY)
    runtime = base / "runtime"
    runtime.mkdir(mode=0o755)
    os.chown(runtime, NOBODY, NOBODY)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with squatting(nobody, str(runtime / "aemagent"), record_dir) as squat:
        assert paths.default_socket_path() == squat.path
        with pytest.raises(wire.UntrustedPeer) as caught:
            wire.request(squat.path, "GET", "/v1/token")
        assert str(caught.value) == (
            f"the socket at {squat.path} is served by uid {NOBODY}, not by you (uid 0):"
            " refusing to talk to it"
        )
        assert (caught.value.permission, caught.value.peer_uid) == (True, NOBODY)
        assert_nothing_sent(squat)

        monkeypatch.delenv("XDG_RUNTIME_DIR")  # now it is some user's agent root was sent to
        reply = wire.request(squat.path, "GET", "/v1/health")
        assert reply.status == 200
        assert squat.received()[1:] == [
            "GET /v1/health HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n\r\n"
        ]


@linux_as_root
def test_our_own_agent_is_served(base: Path, nobody: procs.UserPython) -> None:
    """A real agent run by nobody, asked by nobody (same uid) and by root: both served."""
    os.chown(base, NOBODY, NOBODY)
    sock = str(base / "s" / "agent.sock")
    with procs.serving(sock, base / "agent.log", env={"HOME": str(base)}, user=nobody) as agent:
        assert procs.wait_for_agent(sock) == agent.pid  # root
        env = procs.base_env(sock, **nobody.env, HOME=str(base))
        mine = procs.run(nobody.argv("-m", "aemagent", "status", "--json"), env)
        assert (mine.returncode, json.loads(mine.stdout)) == (0, {"profiles": []}), mine.stderr


# ---- unit: reading the peer's credentials


class FakeSock:
    def __init__(self, data: bytes | OSError) -> None:
        self.data = data
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.asked.append((level, option, size))
        if isinstance(self.data, OSError):
            raise self.data
        return self.data


def xucred(uid: int, version: int = 0, ngroups: int = 1) -> bytes:
    order = sys.byteorder
    groups = (20).to_bytes(4, order) + bytes(60)
    return (
        version.to_bytes(4, order) + uid.to_bytes(4, order) + ngroups.to_bytes(2, order)
        + bytes(2) + groups
    )  # fmt: skip


def ucred(uid: int) -> bytes:
    order = sys.byteorder
    return (1234).to_bytes(4, order) + uid.to_bytes(4, order) + (5).to_bytes(4, order)


@pytest.fixture
def as_user(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pretend to be uid 1000 (so that only 1000 and root are trusted)."""
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    return 1000


def test_xucred_parsing() -> None:
    assert len(xucred(501)) == 76
    assert wire._xucred_uid(xucred(501)) == 501
    assert wire._xucred_uid(xucred(0)[:8]) == 0  # cr_uid is all we read
    with pytest.raises(ValueError, match="version 1, not 0"):
        wire._xucred_uid(xucred(501, version=1))
    for short in (b"", xucred(501)[:4], xucred(501)[:7]):
        with pytest.raises(ValueError, match=f"gave {len(short)} bytes"):
            wire._xucred_uid(short)


@pytest.mark.parametrize(
    ("data", "trusted"),
    [
        (xucred(1000), True),
        (xucred(0), True),
        (xucred(501), False),
        (xucred(1000, version=1), False),  # a layout we do not know: refuse
        (xucred(1000)[:7], False),
        (OSError(errno.EINVAL, "Invalid argument"), False),
    ],
    ids=["ours", "root", "another-user", "version-1", "short", "getsockopt-fails"],
)
def test_macos_peer_check(
    monkeypatch: pytest.MonkeyPatch, as_user: int, data: bytes | OSError, trusted: bool
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    sock = FakeSock(data)
    if trusted:
        wire._check_peer(sock, "/x/agent.sock")  # type: ignore[arg-type]
    else:
        with pytest.raises(wire.UntrustedPeer) as caught:
            wire._check_peer(sock, "/x/agent.sock")  # type: ignore[arg-type]
        assert caught.value.permission
        message = str(caught.value)
        assert "\n" not in message
        assert message.endswith("refusing to talk to it")
        assert message.startswith(
            "the socket at /x/agent.sock is served by uid 501, not by you (uid 1000)"
            if data == xucred(501)
            else "cannot tell who serves the socket at /x/agent.sock ("
        )
    assert sock.asked == [(0, 1, 76)]  # SOL_LOCAL, LOCAL_PEERCRED, sizeof(struct xucred)


@pytest.mark.parametrize(
    ("data", "trusted"),
    [(ucred(1000), True), (ucred(0), True), (ucred(1001), False), (ucred(1000)[:6], False)],
    ids=["ours", "root", "another-user", "short"],
)
def test_linux_peer_check(
    monkeypatch: pytest.MonkeyPatch, as_user: int, data: bytes, trusted: bool
) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    sock = FakeSock(data)
    if trusted:
        wire._check_peer(sock, "/x/agent.sock")  # type: ignore[arg-type]
    else:
        with pytest.raises(wire.UntrustedPeer):
            wire._check_peer(sock, "/x/agent.sock")  # type: ignore[arg-type]
    assert sock.asked == [(socket.SOL_SOCKET, 17, 12)]  # SO_PEERCRED, sizeof(struct ucred)


def test_unknown_platforms_fail_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "sunos5")
    with pytest.raises(wire.UntrustedPeer) as caught:
        wire._check_peer(FakeSock(ucred(os.getuid())), "/x/agent.sock")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "cannot tell who serves the socket at /x/agent.sock (no way to read a Unix socket's"
        " peer credentials on sunos5): refusing to talk to it"
    )
    assert caught.value.advice == "point $AEMAGENT_SOCK or --socket at your own agent"


def test_a_refused_peer_gets_its_connection_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real listener of ours, with the peer check made to fail: `request` raises
    UntrustedPeer, and the listener sees the connection end with 0 bytes."""
    sock_path = str(tmp_path / "agent.sock")
    monkeypatch.setattr(wire, "_peer_uid", lambda sock: 4242)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(sock_path)
        listener.listen(1)
        with pytest.raises(wire.UntrustedPeer, match="served by uid 4242"):
            wire.request(sock_path, "POST", "/v1/profiles", body=SECRET.encode())
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            assert conn.recv(65536) == b""


# ---- macOS: ECONNREFUSED is a full backlog as well as a stale socket


def test_macos_connection_refused_is_not_called_stale(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A socket bound but not listening refuses like a busy agent on macOS. Broken: "a stale
    socket" on macOS, where the agent may only be busy."""
    sock_path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(sock_path)
        linux = _unreachable(sock_path)
        assert (linux.reason, linux.permission) == ("connection refused: a stale socket", False)
        monkeypatch.setattr(sys, "platform", "darwin")
        mine = _unreachable(sock_path)
        assert (mine.reason, mine.permission) == (
            "connection refused: the agent is busy or gone",
            False,
        )
        if os.getuid() != 0:
            return  # giving the socket away needs root
        os.chown(sock_path, 4242, 4242)
        monkeypatch.setattr(os, "getuid", lambda: 1000)
        theirs = _unreachable(sock_path)
        assert (theirs.reason, theirs.permission) == (
            "connection refused: a socket of uid 4242, busy or gone",
            True,
        )


def _unreachable(sock_path: str) -> wire.AgentUnreachable:
    with pytest.raises(wire.AgentUnreachable) as caught:
        wire.request(sock_path, "GET", "/v1/health", connect_timeout=5.0)
    return caught.value
