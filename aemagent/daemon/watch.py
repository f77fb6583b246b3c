"""The socket watch: notice, at once and at no cost while idle, that our socket file is gone.

`DirectoryWatch` wakes its owner when an entry of the socket's directory changes (inotify(7) on
Linux, through ctypes), so the displacement check costs nothing while nothing happens.
`until_displaced` runs that check: whenever the directory changes, and on the one-minute grid the
agent's timers share, the only check where inotify is unavailable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import sys
from typing import TYPE_CHECKING, Any, Self

from aemagent.core.clocks import on_grid
from aemagent.daemon.unixsocket import identity

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("aemagent.daemon")

# inotify(7): the changes in the socket's directory that wake the displacement check: an entry
# created, removed or renamed (a socket renamed into place is IN_MOVED_TO) or its attributes
# changed, and the directory itself removed or renamed. IN_ONLYDIR: a directory or nothing.
_IN_ATTRIB, _IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE = 0x4, 0x40, 0x80, 0x100
_IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x200, 0x400, 0x800
_IN_IGNORED, _IN_ONLYDIR = 0x8000, 0x01000000
_WATCH_MASK = (
    _IN_CREATE
    | _IN_DELETE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ATTRIB
    | _IN_ONLYDIR
)
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then `len` bytes of name
# The inotify errors that are a limit someone may want to raise, named for the debug line.
_INOTIFY_LIMITS = {
    ("inotify_init1", errno.EMFILE): "fs.inotify.max_user_instances or the open-files limit",
    ("inotify_add_watch", errno.ENOSPC): "fs.inotify.max_user_watches",
}


async def until_displaced(path: str, ours: tuple[int, int], period: float) -> None:
    """Return once the socket file at `path` is no longer `ours` (its identity): removed, or
    replaced by another agent's or systemd's. Checked at once, whenever its directory changes
    (inotify), and on the grid of `period` (the only check without inotify), so an idle daemon
    never wakes for it at an instant of its own."""
    import trio

    with DirectoryWatch(os.path.dirname(path)) as directory:
        if directory.active:
            log.debug("watching %s: inotify, and a check every %g s", path, period)
        else:
            log.debug("watching %s: a check every %g s (%s)", path, period, directory.method)
        changed = trio.lowlevel.ParkingLot()

        async def forward_changes() -> None:
            # Its own task, so the grid's check never cancels (re-arms) the inotify wait.
            while True:
                await directory.changes()
                changed.unpark_all()

        async with trio.open_nursery() as nursery:
            if directory.active:
                nursery.start_soon(forward_changes)
            # At once first: the file may have changed before the watch began.
            while identity(path) == ours:
                with trio.move_on_at(on_grid(trio.current_time(), period, period)):
                    await changed.park()
            nursery.cancel_scope.cancel()


class DirectoryWatch:
    """Wakes its owner when an entry of `directory` changes: inotify(7) on Linux.

    `changes()` returns after one or more changes (the caller then checks what it cares about:
    it is also woken for changes it does not care about). Where no watch could be set up (not
    Linux; ENOSYS, EPERM from a seccomp filter, EMFILE or ENOSPC at one of inotify's limits) or
    once it has ended (the directory removed: one last wake-up, then IN_IGNORED), `active` is
    False and `changes()` never returns: the caller's own periodic check is all there is. Nothing
    here raises for inotify's sake; `method` says in words what watches. Leaving the `with`
    block closes the descriptor.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._fd: int | None = None
        if not sys.platform.startswith("linux"):
            self.method = "no inotify on this system"
            return
        try:
            self._fd = _inotify_watch(directory)
        except OSError as exc:
            self.method = f"inotify unavailable: {exc.strerror or exc}"
        else:
            self.method = "inotify"

    @property
    def active(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def changes(self) -> None:
        """Return once something in the directory changed; never, without a watch."""
        import trio

        while (fd := self._fd) is not None:
            try:
                await trio.lowlevel.wait_readable(fd)
            except (OSError, trio.ClosedResourceError) as exc:  # closed meanwhile, or broken
                self._end(f"inotify failed: {exc}")
                continue
            if self._drain(fd):
                return
        await trio.sleep_forever()

    def _drain(self, fd: int) -> bool:
        """Read every queued event; whether there was any. IN_IGNORED ends the watch."""
        seen = False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return seen
            except OSError as exc:
                self._end(f"inotify failed: {exc.strerror or exc}")
                return True
            if not data:  # never for inotify; here so that a surprise cannot spin
                self._end("inotify read nothing")
                return True
            seen = True
            offset = 0
            while offset + _INOTIFY_EVENT.size <= len(data):
                _wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
                offset += _INOTIFY_EVENT.size + length
                if mask & _IN_IGNORED:  # the directory is gone (or the watch was removed)
                    self._end("the inotify watch ended")
                    return True

    def _end(self, why: str) -> None:
        self.method = why
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if "trio" in sys.modules:
            import trio

            with contextlib.suppress(RuntimeError):  # outside trio.run: nobody can be waiting
                trio.lowlevel.notify_closing(fd)
        os.close(fd)


def _libc() -> Any:
    """The C library, already loaded in the process (a function, so tests can replace it)."""
    import ctypes  # here: imported only once a watch is set up

    return ctypes.CDLL(None, use_errno=True)


def _inotify_watch(directory: str) -> int:
    """A non-blocking inotify descriptor watching `directory`, or OSError."""
    import ctypes

    try:
        libc = _libc()
        init1, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, f"no inotify in the C library ({exc})") from None
    init1.argtypes = (ctypes.c_int,)
    add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
    fd = int(init1(os.O_NONBLOCK | os.O_CLOEXEC))  # IN_NONBLOCK, IN_CLOEXEC are these by definition
    if fd < 0:
        raise _inotify_error("inotify_init1")
    if add_watch(fd, os.fsencode(directory), _WATCH_MASK) < 0:
        error = _inotify_error("inotify_add_watch")
        os.close(fd)
        raise error
    return fd


def _inotify_error(call: str) -> OSError:
    import ctypes

    code = ctypes.get_errno()
    limit = _INOTIFY_LIMITS.get((call, code))
    text = f"{call}: {os.strerror(code)}" + (f" ({limit})" if limit else "")
    return OSError(code, text)
