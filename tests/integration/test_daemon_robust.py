"""The daemon against failures of one connection or of its start, and the socket-directory rule.

* A failure inside one connection's task (peer_uid raising an OSError or a struct.error, here
  injected) closes that connection with one log line; the daemon serves the next one.
* An OSError while binding at start (a directory it cannot write) is one line on stderr and
  exit 1, not a traceback.
* The socket directory may be readable by others (a 0755 home); it must not be writable by
  them, sticky or not, and must be ours or root's.

Each test names how it was seen to fail with its fix removed ("Broken: ...").
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import stat
import struct
import sys
from pathlib import Path

import procs
import pytest
import trio
from fakes import FakeIMS, LinkedClock

from aemagent.cli.launch import agent_pid
from aemagent.daemon import server as daemon
from aemagent.daemon import unixsocket
from aemagent.daemon.server import DaemonSettings, serve_agent
from aemagent.errors import SocketDirError
from aemagent.wire import request

NOBODY = 65534
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="setpriv, and uid 65534 from /etc/passwd"
)


# ---- one bad connection


async def _serve(settings: DaemonSettings, *, task_status: trio.TaskStatus[str]) -> None:
    clock = LinkedClock()
    await serve_agent(settings, clock=clock, ims=FakeIMS(clock), task_status=task_status)  # type: ignore[arg-type]


async def _exchange(path: str) -> bytes:
    """One raw health request; every byte the daemon answers, until it closes."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(path)
        await sock.send(b"GET /v1/health HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n\r\n")
        received = b""
        try:
            while chunk := await sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


async def test_a_failure_in_one_connection_closes_it_and_the_daemon_serves_the_next(
    base: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """peer_uid raising an unexpected OSError (getsockopt's EIO, say) or a struct.error (an
    answer of a size nobody expected), injected here: that client is closed without an answer,
    one warning line says why, and the next client is served.

    Broken: without the guard in `_Server._connection`, the first failure escapes the
    connection's task, kills the connections' nursery and with it the daemon: serve_agent
    raises, and the next connect is refused."""
    caplog.set_level(logging.INFO, logger="aemagent")
    failures: list[BaseException] = [OSError(5, "Input/output error"), struct.error("short")]
    real = unixsocket.peer_uid  # what the server imported

    def failing_peer_uid(conn: trio.socket.SocketType) -> int | None:
        if failures:
            raise failures.pop(0)
        return real(conn)

    monkeypatch.setattr(daemon, "peer_uid", failing_peer_uid)
    directory = base / "run"  # `base`: short enough for a socket path on macOS too
    directory.mkdir(mode=0o700)
    settings = DaemonSettings(socket_path=str(directory / "agent.sock"))
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            path = await nursery.start(_serve, settings)
            assert await _exchange(path) == b""  # OSError: closed, no answer
            assert await _exchange(path) == b""  # struct.error: likewise
            served = await _exchange(path)
            assert served.startswith(b"HTTP/1.1 200 "), served
            reply = await trio.to_thread.run_sync(lambda: request(path, "GET", "/v1/health"))
            assert reply.status == 200
            nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "closed a connection after an error: OSError (Input/output error)",
        "closed a connection after an error: struct.error",
    ]


# ---- an OSError at start


@pytest.mark.integration
@linux_only
def test_a_directory_the_daemon_cannot_write_is_one_line_and_exit_1(
    base: Path, nobody: procs.UserPython
) -> None:
    """`aemagent serve` as uid 65534 in its own directory made read-only (0500), with its lock
    file already there (so the lock succeeds, and the bind is the first write): one line on
    stderr, naming what it could not do and why, exit 1, nothing left behind.

    (Root is not stopped by modes, hence another user.) Broken: before bind_socket turned its
    OSErrors into one line, this was a PermissionError traceback from `sock.bind`."""
    gid = pwd.getpwuid(NOBODY).pw_gid
    os.chown(base, NOBODY, gid)
    directory = base / "s"
    directory.mkdir(mode=0o700)
    sock = str(directory / "agent.sock")
    lock = Path(sock + ".lock")
    lock.touch(mode=0o600)
    for made in (directory, lock):
        os.chown(made, NOBODY, gid)
    directory.chmod(0o500)
    env = procs.base_env(HOME=str(base), **nobody.env)
    served = procs.run(nobody.argv("-m", "aemagent", "serve", "--socket", sock), env, timeout=20)
    assert served.returncode == 1, served.stderr
    assert served.stdout == ""
    (line,) = served.stderr.strip().splitlines()
    assert "cannot bind a socket at " in line, line
    assert "Permission denied" in line, line
    assert "Traceback" not in served.stderr
    assert sorted(os.listdir(directory)) == ["agent.sock.lock"]


# ---- the socket-directory rule


@pytest.mark.integration
@linux_only
@pytest.mark.parametrize("mode", [0o755, 0o711, 0o750])
def test_a_socket_directory_others_can_read_but_not_write_is_served(base: Path, mode: int) -> None:
    """AEMAGENT_SOCK=$HOME/agent.sock with a 0755 home: nobody else can create, rename or
    remove a name there, and the socket itself is 0600 with the peer's uid checked.

    Broken: the old rule (`mode & 0o077`) refused these as "open to other users"."""
    home = base / "home"
    home.mkdir()
    home.chmod(mode)
    sock = str(home / "agent.sock")
    with procs.serving(sock, base / "agent.log") as agent:
        assert agent_pid(sock) == agent.pid
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert stat.S_IMODE(os.lstat(home).st_mode) == mode  # left as it was


def _refusal(directory: Path) -> str:
    with pytest.raises(SocketDirError) as refused:
        unixsocket.ensure_private_dir(str(directory))
    return str(refused.value)


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o770, 0o1777, 0o1770])
def test_a_socket_directory_others_can_write_is_refused_sticky_or_not(
    tmp_path: Path, mode: int
) -> None:
    """The sticky bit keeps others from removing our names, not from creating them first: the
    socket's name (an impostor listening there), the lock's or the temporary name's."""
    directory = tmp_path / "d"
    directory.mkdir()
    directory.chmod(mode)
    message = _refusal(directory)
    assert f"socket directory {directory} is writable by other users (mode {mode:04o}" in message
    if mode & stat.S_ISVTX:
        assert f"{directory}/aemagent-{os.getuid()}/" in message  # a directory of its own
    else:
        assert f"chmod go-w {directory}" in message


def test_a_root_owned_closed_directory_is_accepted_and_anothers_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As uid 4242 (faked): a directory root owns and only root can write is fine (root could
    do anything to us anyway; writing there is then root's to allow); one of uid 4243 is not."""
    if os.getuid() != 0:
        pytest.skip("the directories are made with root's uid and chowned")
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # the os module unixsocket calls
    rooted = tmp_path / "root"
    rooted.mkdir(mode=0o755)
    rooted.chmod(0o755)
    unixsocket.ensure_private_dir(str(rooted))
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 4243, 4243)
    assert "belongs to uid 4243, not to uid 4242" in _refusal(theirs)


def test_a_new_socket_directory_is_still_made_0700(tmp_path: Path) -> None:
    directory = tmp_path / "new"
    old = os.umask(0)
    try:
        unixsocket.ensure_private_dir(str(directory))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
