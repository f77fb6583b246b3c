"""macOS code paths, run here with the platform (and the C library, the socket) faked: the default
socket path, the boot clock, PT_DENY_ATTACH, LOCAL_PEERCRED, and the stale-socket check.

Each test names how it was seen to fail with its fix removed ("Broken: ...").
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from aemagent import paths
from aemagent.core import clocks
from aemagent.daemon import hardening, unixsocket

UID = os.getuid()
FALLBACK = f"/tmp/aemagent-{UID}/agent.sock"
TEMP = "/var/folders/zz/zyxvpxvq6csfxvn_n0000000000000/T/"


# ---- the default socket path on macOS


class FakeConfstr:
    """os.confstr as CPython has it on macOS: no "CS_DARWIN_USER_TEMP_DIR" in its table (a
    ValueError for the name), but the number answers."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked: list[object] = []

    def __call__(self, name: object) -> str:
        self.asked.append(name)
        if isinstance(name, str):
            raise ValueError("unrecognized configuration name")
        assert name == 65537  # _CS_DARWIN_USER_TEMP_DIR in Darwin's <unistd.h>
        return self.answer


def _darwin(**kwargs: object) -> str:
    kwargs.setdefault("uid", UID)
    kwargs.setdefault("environ", {})
    return paths.default_socket_path(platform="darwin", **kwargs)  # type: ignore[arg-type]


def test_darwin_asks_confstr_by_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """Broken: os.confstr("CS_DARWIN_USER_TEMP_DIR") (a name CPython does not know) always
    raised, and macOS always fell back to /tmp."""
    fake = FakeConfstr(TEMP)
    monkeypatch.setattr(os, "confstr", fake)
    assert _darwin() == TEMP + "aemagent/agent.sock"
    assert fake.asked == [65537]


def test_darwin_prefers_tmpdir_as_launchd_sets_it(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$TMPDIR, when it is launchd's, is used without asking confstr. `base`, a short
    directory as /var/folders/…/T/ is, stands for /var/folders here."""
    temp = base / "T"
    temp.mkdir(mode=0o700)
    temp.chmod(0o700)
    monkeypatch.setattr(paths, "_DARWIN_TEMP_ROOTS", (str(base) + "/",))
    fake = FakeConfstr("/elsewhere/")
    monkeypatch.setattr(os, "confstr", fake)
    assert _darwin(environ={"TMPDIR": f"{temp}/"}) == f"{temp}/aemagent/agent.sock"
    assert fake.asked == []


@pytest.mark.parametrize("case", ["group-writable", "world-writable", "not-ours", "elsewhere"])
def test_darwin_ignores_a_tmpdir_that_is_not_launchds(
    base: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A TMPDIR others can write to (TMPDIR=/tmp), someone else's, or one of the user's own
    choosing (which a GUI app or cron job would not see): confstr decides."""
    temp = base / "T"
    temp.mkdir(mode=0o700)
    temp.chmod({"group-writable": 0o770, "world-writable": 0o1777}.get(case, 0o700))
    roots = "/nowhere/" if case == "elsewhere" else str(base) + "/"
    monkeypatch.setattr(paths, "_DARWIN_TEMP_ROOTS", (roots,))
    monkeypatch.setattr(os, "confstr", FakeConfstr(TEMP))
    uid = UID + 4242 if case == "not-ours" else UID
    expected = TEMP + "aemagent/agent.sock"
    assert _darwin(environ={"TMPDIR": str(temp)}, uid=uid) == expected


def test_darwin_without_confstr_or_tmpdir_falls_back_to_tmp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(name: object) -> str:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "confstr", broken)
    assert _darwin() == FALLBACK
    monkeypatch.setattr(os, "confstr", lambda name: None)  # confstr(3) answered nothing
    assert _darwin() == FALLBACK


# ---- the boot clock


def test_the_boot_clock_is_monotonic_on_darwin_and_boottime_on_linux(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broken: reading time.monotonic() on macOS (mach_absolute_time: it stops while the Mac
    sleeps), where CLOCK_MONOTONIC counts through sleep."""
    read: list[int] = []

    def clock_gettime(clock_id: int) -> float:
        read.append(clock_id)
        return 42.0

    monkeypatch.setattr(time, "clock_gettime", clock_gettime)
    monkeypatch.setattr(time, "CLOCK_MONOTONIC", 6, raising=False)  # Darwin's number
    monkeypatch.delattr(time, "CLOCK_BOOTTIME", raising=False)  # Darwin has none
    assert clocks.SystemClock(platform="darwin").now().boot == 42.0
    assert read == [6]

    monkeypatch.setattr(time, "CLOCK_BOOTTIME", 7, raising=False)
    read.clear()
    assert clocks.SystemClock(platform="linux").now().boot == 42.0
    assert read == [7]


# ---- PT_DENY_ATTACH


class FakeLibc:
    def __init__(self, result: int = 0) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.result = result

    def ptrace(self, *args: object) -> int:
        self.calls.append(("ptrace", *args))
        return self.result

    def prctl(self, *args: object) -> int:
        self.calls.append(("prctl", *args))
        return self.result


def test_darwin_denies_debuggers_with_pt_deny_attach_and_linux_is_not_dumpable() -> None:
    """Broken: before, macOS made no call at all (only Linux's prctl)."""
    mac = FakeLibc()
    hardening.deny_debuggers("darwin", mac)
    assert mac.calls == [("ptrace", 31, 0, None, 0)]  # PT_DENY_ATTACH, as ssh-agent does
    linux = FakeLibc()
    hardening.deny_debuggers("linux", linux)
    assert linux.calls == [("prctl", 4, 0, 0, 0, 0)]  # PR_SET_DUMPABLE, 0
    other = FakeLibc()
    hardening.deny_debuggers("freebsd14", other)
    assert other.calls == []


def test_a_failed_pt_deny_attach_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    hardening.deny_debuggers("darwin", FakeLibc(result=-1))
    (record,) = caplog.records
    assert record.getMessage().startswith("ptrace(PT_DENY_ATTACH) failed: ")


# ---- LOCAL_PEERCRED


class FakeSocket:
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.asked: list[tuple[int, int, int]] = []

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        self.asked.append((level, option, size))
        return self.answer


def _xucred(version: int, uid: int, size: int = 76) -> bytes:
    raw = struct.pack("=IIh", version, uid, 1) + b"\0" * 2 + struct.pack("=I", 20)
    return (raw + b"\0" * size)[:size]


def test_darwin_peer_uid_reads_xucred_and_checks_its_version_and_size() -> None:
    """Broken: before, any answer was read as an xucred: a version 1 (a layout we do not know)
    or a short answer gave a uid read from the wrong bytes, or a struct.error."""
    good = FakeSocket(_xucred(0, 501))
    assert unixsocket.peer_uid(good, platform="darwin") == 501  # type: ignore[arg-type]
    assert good.asked == [(0, 1, 76)]  # SOL_LOCAL, LOCAL_PEERCRED, sizeof(struct xucred)
    assert unixsocket.peer_uid(FakeSocket(_xucred(1, 501)), platform="darwin") is None  # type: ignore[arg-type]
    assert unixsocket.peer_uid(FakeSocket(_xucred(0, 501, 6)), platform="darwin") is None  # type: ignore[arg-type]
    assert unixsocket.peer_uid(FakeSocket(_xucred(0, 501, 72)), platform="darwin") is None  # type: ignore[arg-type]


def test_linux_peer_uid_refuses_a_short_answer() -> None:
    """Broken: struct.unpack on a short answer raised struct.error out of the handler."""
    whole = FakeSocket(struct.pack("3i", 10, 1000, 1000))
    assert unixsocket.peer_uid(whole, platform="linux") == 1000  # type: ignore[arg-type]
    assert unixsocket.peer_uid(FakeSocket(b"\0" * 8), platform="linux") is None  # type: ignore[arg-type]


def test_peer_uid_of_a_real_connection(base: Path) -> None:
    """The real getsockopt: SO_PEERCRED here, LOCAL_PEERCRED on macOS (in CI). `base` is a
    short directory: macOS's tmp_path is too long for a socket path."""
    path = str(base / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                assert unixsocket.peer_uid(conn) == UID  # type: ignore[arg-type]


# ---- a refused connection on macOS is asked again before the socket counts as stale


def test_darwin_asks_a_refusing_socket_again_before_calling_it_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """macOS answers ECONNREFUSED when a live listener's backlog is full. Broken: one refusal
    made the socket stale, and the daemon's start then renamed its own socket over it."""
    answers: list[bool | None] = []

    def connect_once(path: str) -> bool | None:
        return answers.pop(0)

    monkeypatch.setattr(unixsocket, "_connect_once", connect_once)
    monkeypatch.setattr(unixsocket, "_DARWIN_REFUSED_PAUSE", 0.0)
    answers[:] = [None, None, True]  # refused twice (a full backlog), then accepted
    assert unixsocket._accepts("/x", platform="darwin") is True
    assert answers == []
    answers[:] = [None] * 6  # refused every time: stale
    assert unixsocket._accepts("/x", platform="darwin") is False
    assert answers == []
    answers[:] = [None, True]  # Linux: a refusal is final (a full backlog says EAGAIN there)
    assert unixsocket._accepts("/x", platform="linux") is False
    assert answers == [True]


def test_a_stale_socket_refuses_and_a_listening_one_accepts(base: Path) -> None:
    stale = str(base / "stale")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(stale)  # bound, never listening: what a killed daemon leaves behind
    assert unixsocket._connect_once(stale) is None
    assert unixsocket._connect_once(str(base / "missing")) is False
    live = str(base / "live")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(live)
        listener.listen()
        assert unixsocket._accepts(live, platform="darwin") is True
