"""What an idle daemon wakes for: the socket watch (inotify, else the one-minute grid) and the
systemd status reporter, in process, on real directories and on trio's MockClock.

The daemon-level displacement tests with real processes are in test_daemon.py and
test_activation.py; here are the parts: `DirectoryWatch` on a temp directory, the watch with
inotify made to fail, and `report_status`'s cost under a burst of requests and at rest.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from fakes import FakeCredential, FakeIMS, LinkedClock

from aemagent.core.agent import Agent
from aemagent.daemon import server as daemon
from aemagent.daemon import watch as dirwatch
from aemagent.daemon.config import Config
from aemagent.daemon.server import DaemonSettings, serve_agent
from aemagent.daemon.sources import ConfigProfiles
from aemagent.daemon.systemd import Notifier
from aemagent.daemon.unixsocket import identity
from aemagent.daemon.watch import DirectoryWatch

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")

# Longer than any test: the grid's check never comes during one (unless a test says otherwise).
NEVER = 1e9


async def _wakes(watch: DirectoryWatch, change: Callable[[], object], within: float = 1.0) -> bool:
    """Whether `watch.changes()` returns after `change()` (and not before it)."""
    with trio.move_on_after(0.05):
        await watch.changes()
        return False  # woke with nothing changed
    change()
    with trio.move_on_after(within):
        await watch.changes()
        return True
    return False


@linux_only
async def test_a_directory_watch_wakes_for_entries_created_removed_renamed_and_its_end(
    tmp_path: Path,
) -> None:
    """Broken: a mask without IN_MOVED_TO misses a socket renamed into place (how every agent
    and systemd's replacement appear); without the IN_IGNORED check a removed directory's
    watch is waited on for ever instead of ending (`active` stays True)."""
    with DirectoryWatch(str(tmp_path)) as watch:
        assert (watch.active, watch.method) == (True, "inotify")
        other = tmp_path.parent / f"{tmp_path.name}-elsewhere"
        assert await _wakes(watch, (tmp_path / "a").touch)
        assert await _wakes(watch, (tmp_path / "a").unlink)
        other.touch()
        assert await _wakes(watch, lambda: other.rename(tmp_path / "b"))
        assert await _wakes(watch, lambda: (tmp_path / "b").chmod(0o600))
        assert await _wakes(watch, (tmp_path / "b").unlink)
        assert await _wakes(watch, tmp_path.rmdir)  # the last wake-up: IN_DELETE_SELF
        assert not watch.active
        assert "ended" in watch.method
        assert not await _wakes(watch, lambda: None, within=0.1)  # now it never returns
    tmp_path.mkdir()  # for pytest's own cleanup


@linux_only
async def test_a_closed_watch_frees_its_descriptor(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with DirectoryWatch(str(tmp_path)) as watch:
            assert watch.active
            assert len(os.listdir("/proc/self/fd")) == before + 1
    assert len(os.listdir("/proc/self/fd")) == before


def _failing(code: int) -> Callable[..., int]:
    def call(*args: object) -> int:
        ctypes.set_errno(code)
        return -1

    return call


@linux_only
@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("no-symbol", "no inotify in the C library"),
        ("seccomp", "inotify_init1: Operation not permitted"),
        ("instances", "max_user_instances"),
        ("watches", "inotify_add_watch: No space left on device (fs.inotify.max_user_watches)"),
    ],
)
async def test_an_unavailable_inotify_gives_an_inactive_watch_that_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, said: str
) -> None:
    """ENOSYS (no such function), EPERM (a seccomp filter), EMFILE and ENOSPC (inotify's
    limits): never an exception, an inactive watch whose `changes()` never returns, and no
    descriptor left open. Broken: raising from DirectoryWatch would end the daemon."""
    opened: list[int] = []

    def init1(flags: int) -> int:
        read_end, write_end = os.pipe()
        os.close(write_end)
        opened.append(read_end)
        return read_end

    fake = {
        "no-symbol": types.SimpleNamespace(),
        "seccomp": types.SimpleNamespace(
            inotify_init1=_failing(errno.EPERM), inotify_add_watch=_failing(errno.EPERM)
        ),
        "instances": types.SimpleNamespace(
            inotify_init1=_failing(errno.EMFILE), inotify_add_watch=_failing(errno.EBADF)
        ),
        "watches": types.SimpleNamespace(
            inotify_init1=init1, inotify_add_watch=_failing(errno.ENOSPC)
        ),
    }[case]
    monkeypatch.setattr(dirwatch, "_libc", lambda: fake)
    with DirectoryWatch(str(tmp_path)) as watch:
        assert not watch.active
        assert said in watch.method, watch.method
        assert not await _wakes(watch, (tmp_path / "a").touch, within=0.1)
    for fd in opened:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


# ---- the daemon's socket watch, in process


def _settings(base: Path, **kw: float) -> DaemonSettings:
    directory = base / "run"
    directory.mkdir(mode=0o700)
    return DaemonSettings(socket_path=str(directory / "agent.sock"), **kw)  # type: ignore[arg-type]


async def _serve(
    settings: DaemonSettings, clock: LinkedClock, *, task_status: trio.TaskStatus[str]
) -> None:
    """The real daemon in this process, with a fake IMS (nothing here fetches a token)."""
    ims = FakeIMS(clock)
    await serve_agent(settings, clock=clock, ims=ims, task_status=task_status)  # type: ignore[arg-type]


async def _serve_until_displaced(
    settings: DaemonSettings, displace: Callable[[str], object], *, within: float
) -> float:
    """Serve in process, `displace(path)`, and return how long the daemon took to stop."""
    clock = LinkedClock()
    with trio.fail_after(within + 10):
        async with trio.open_nursery() as nursery:
            path = await nursery.start(_serve, settings, clock)
            await trio.sleep(0.1)  # the watch is up (it checks once on its own first)
            began = trio.current_time()
            displace(path)
        took = trio.current_time() - began
    assert took < within, f"the daemon took {took:.2f} s to notice"
    return took


@linux_only
async def test_the_socket_watch_wakes_only_for_changes_and_a_removal_stops_it_at_once(
    base: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Idle, the watch makes no check at all (no poll: the grid is set to never here); an
    unrelated file in the directory wakes it for one check, and the daemon serves on; removing
    the socket stops it within a moment. Broken: with the 5 s poll it replaced, the checks
    count past 1 while idle, and the removal takes up to 5 s."""
    caplog.set_level(logging.DEBUG, logger="aemagent")
    checks: list[str] = []

    def counting_identity(path: str) -> tuple[int, int] | None:
        checks.append(path)
        return identity(path)

    monkeypatch.setattr(dirwatch, "identity", counting_identity)
    settings = _settings(base, watch_poll_interval=NEVER)
    directory = os.path.dirname(settings.socket_path)

    clock = LinkedClock()
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            path = await nursery.start(_serve, settings, clock)
            await trio.sleep(0.2)
            assert checks == [path]  # the first check, at once
            await trio.sleep(1.0)
            assert checks == [path]  # nothing happened: no check
            with open(os.path.join(directory, "unrelated"), "w"):
                pass
            await trio.sleep(0.2)
            assert checks[1:] == [path]  # one wake-up for the one change (IN_CREATE)
            began = trio.current_time()
            os.unlink(path)
        took = trio.current_time() - began
    assert took < 1.0, f"{took:.2f} s"
    assert f"watching {path}: inotify, and a check every {NEVER:g} s" in caplog.text
    assert "was removed or replaced" in caplog.text


@linux_only
async def test_a_socket_replaced_by_another_stops_the_daemon_which_leaves_it_alone(
    base: Path,
) -> None:
    settings = _settings(base, watch_poll_interval=NEVER)
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs: list[tuple[int, int] | None] = []

    def replace(path: str) -> None:
        temporary = os.path.join(os.path.dirname(path), "successor~")
        successor.bind(temporary)
        successor.listen()
        os.rename(temporary, path)  # as another agent appears: IN_MOVED_TO
        theirs.append(identity(path))

    try:
        await _serve_until_displaced(settings, replace, within=1.0)
        assert identity(settings.socket_path) == theirs[0]  # still the successor's
    finally:
        successor.close()


async def test_without_inotify_the_grid_check_still_notices(
    base: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """inotify unavailable (here: no such function in the C library): the daemon serves on,
    says so once at debug level, and the check on the grid (0.5 s here, a minute by default)
    finds the socket gone. Broken: an exception from the watch setup ends the daemon with a
    traceback; a watch that waited on inotify only would never notice."""
    caplog.set_level(logging.DEBUG, logger="aemagent")
    monkeypatch.setattr(dirwatch, "_libc", types.SimpleNamespace)
    settings = _settings(base, watch_poll_interval=0.5)
    await _serve_until_displaced(settings, os.unlink, within=1.5)
    watching = [r.getMessage() for r in caplog.records if "watching" in r.getMessage()]
    assert len(watching) == 1, watching
    assert "a check every 0.5 s (" in watching[0], watching
    assert "was removed or replaced" in caplog.text


# ---- the status reporter


class RecordingNotifier(Notifier):
    def __init__(self) -> None:
        super().__init__("@unused")
        self.sent: list[tuple[float, str]] = []

    def send(self, message: str) -> None:
        self.sent.append((trio.current_time(), message))


async def test_status_follows_the_profiles_at_a_cost_bounded_by_time_not_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """STATUS= follows an add (refreshing, then valid once the fetch ends, with no request in
    between); a burst of 1000 requests in 10 s recomputes the line at most once a second; at rest
    it is recomputed once a minute, on the agent's grid (multiples of 60 s of trio's clock).

    Broken: the old reporter recomputed after every request (1000 times) and spawned a task per
    profile each time; without the once-a-second pass while a fetch is up, STATUS= stays at
    "refreshing" for up to a minute."""
    clock = LinkedClock()
    ims = FakeIMS(clock, latency=5.0)
    agent = Agent(ims, clock=clock)
    notifier = RecordingNotifier()
    server = daemon._Server(
        DaemonSettings(socket_path="/nonexistent/agent.sock"),
        agent,
        ConfigProfiles(agent, Config()),
        notifier,
    )
    computed: list[float] = []
    real_status = server.status

    def counting_status() -> str:
        computed.append(trio.current_time())
        return real_status()

    server.status = counting_status  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        nursery.start_soon(server.report_status)
        await trio.sleep(0.5)
        await agent.add(FakeCredential())
        server._status_due.set()  # as `_handle` does after the POST
        await trio.sleep(10)
        lines = [message for _, message in notifier.sent]
        assert lines == [
            "STATUS=no profiles; add one with `aemagent add FILE`",
            "STATUS=1 profile: 1 refreshing",
            "STATUS=1 profile: 1 valid",
        ]
        fetched = ims.calls[0][0] + ims.latency
        assert 0 <= notifier.sent[-1][0] - fetched <= 1.0

        before = len(computed)
        for _ in range(1000):
            server._status_due.set()
            await trio.sleep(0.01)
        assert len(computed) - before <= 11

        await trio.sleep(60)  # whatever the burst left pending is done
        computed.clear()
        await trio.sleep(600)
        assert len(computed) == 10, computed
        assert all(t % 60 == 0 for t in computed), computed
        assert len(notifier.sent) == 3
        nursery.cancel_scope.cancel()
