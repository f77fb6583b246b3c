"""The agent's socket file: a private directory, a lifetime lock, an atomic appearance.

* The directory must be a real directory, ours or root's, that no other user can write to; we
  create it 0700 (like ssh-agent's), and refuse one that is not, naming path, owner and mode.
* `flock` on `<socket>.lock` is held for the daemon's whole life: a socket whose lock nobody
  holds is stale and may be replaced; one whose lock is held belongs to a live daemon, however
  slow, and is never touched.
* The socket is bound under a temporary name, listens, and only then is renamed into place, so
  the path never names a socket that refuses connections. An existing socket is replaced only
  when connecting to it is refused (stale; on macOS, which also refuses when a live listener's
  backlog is full, refused again over ~100 ms); one that accepts belongs to a listener that holds
  no lock, such as a systemd socket unit, and is left alone.
* Under socket activation (sd_listen_fds(3)) systemd binds the socket; `inherited_socket` takes
  it from fd 3 and names its path, so that the lock and the displacement check still apply.
* `DirectoryWatch` wakes the displacement check when an entry of the socket's directory changes
  (inotify(7) on Linux), so that check costs nothing while nothing happens.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import socket
import stat
import struct
import sys
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any, Self

from aemagent.errors import SocketDirError
from aemagent.paths import lock_path

if TYPE_CHECKING:
    from types import TracebackType

    import trio

# Linux allows 108 bytes in sun_path (107 plus NUL), macOS 104.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
LISTEN_BACKLOG = 1024


# sd_listen_fds(3): inherited sockets start at this descriptor.
SD_LISTEN_FDS_START = 3


class AlreadyRunning(Exception):
    """Another live daemon holds the lock for this socket path, or something else listens there."""

    def __init__(self, path: str, pid: int | None, *, who: str | None = None) -> None:
        self.path, self.pid = path, pid
        who = who or (f"an agent (pid {pid})" if pid else "an agent (another process)")
        super().__init__(f"{who} already serves {path}")


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ensure_private_dir(directory: str) -> None:
    """Create `directory` 0700 if missing; refuse it unless a real directory, ours (or root's),
    that no other user can write to.

    Reading or entering it is not refused (a socket in a 0755 home is fine, as for ssh-agent
    -a and OpenSSH's StrictModes): the socket is 0600 and every connection's uid is checked.
    What matters is who can change its entries, i.e. remove, rename or create names in it: with
    write access another user could put their own socket at our path (an impostor that clients
    would send credentials to) or take the lock's or the temporary name first. The sticky bit
    (/tmp) protects names that exist, not names still to be created, so it is no exception.
    Root may own it: root can do anything to us anyway."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise SocketDirError(
            f"cannot create socket directory {directory}: its parent does not exist"
        ) from None
    except OSError as exc:
        raise SocketDirError(
            f"cannot create socket directory {directory}: {exc.strerror}"
        ) from None
    st = os.lstat(directory)
    me = os.getuid()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise SocketDirError(
            f"socket directory {directory} is a symbolic link (owner {_owner_name(st.st_uid)},"
            f" mode {mode:04o}), not a directory of its own; remove it or choose another"
            " --socket path"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(
            f"socket directory {directory} is not a directory (owner {_owner_name(st.st_uid)},"
            f" mode {mode:04o}); remove it or choose another --socket path"
        )
    if st.st_uid not in (me, 0):
        raise SocketDirError(
            f"socket directory {directory} belongs to {_owner_name(st.st_uid)}, not to"
            f" {_owner_name(me)} (mode {mode:04o}); remove it or choose another --socket path"
        )
    if mode & 0o022:
        if mode & stat.S_ISVTX:  # /tmp: they cannot remove our names, but can take them first
            hint = (
                "the sticky bit does not stop them taking the socket's name first; put it in a"
                f" directory of its own, such as {os.path.join(directory, f'aemagent-{me}')}/"
            )
        else:
            hint = f"run `chmod go-w {directory}` or choose another --socket path"
        raise SocketDirError(
            f"socket directory {directory} is writable by other users (mode {mode:04o}, owner"
            f" {_owner_name(st.st_uid)}); {hint}"
        )


class LifetimeLock:
    """An exclusive `flock` on `<socket>.lock`, held until `release()` or process exit."""

    def __init__(self, socket_path: str) -> None:
        self.path = lock_path(socket_path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            self._fd: int | None = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise SocketDirError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = read_lock_pid(self.path)
            os.close(self._fd)
            self._fd = None
            raise AlreadyRunning(socket_path, pid) from None
        try:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # a full disk, say
            self.release()
            raise SocketDirError(f"cannot write lock file {self.path}: {exc.strerror}") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_lock_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read(32).strip() or b"0") or None
    except (OSError, ValueError):
        return None


def lock_is_held(socket_path: str) -> bool:
    """Whether a live daemon holds the lock of `socket_path` (without disturbing it)."""
    try:
        fd = os.open(lock_path(socket_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, or None: how we notice being displaced."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


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
    import ctypes  # here: only the daemon watches, and ctypes would slow every CLI's import

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


async def bind_socket(path: str) -> tuple[trio.socket.SocketType, tuple[int, int]]:
    """Bind, listen, then rename into place; returns the socket and the file's identity."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.getpid()}~")
    # The temporary name must fit too: with a short socket name it is the longer of the two.
    sizes = len(os.fsencode(path)), len(os.fsencode(temporary))
    if max(sizes) > MAX_SOCKET_PATH:
        raise SocketDirError(
            f"socket path {path} is too long: {sizes[0]} bytes, and {sizes[1]} for the"
            f" temporary name the agent binds beside it; the limit is {MAX_SOCKET_PATH}:"
            " choose a shorter --socket path"
        )
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _cannot(f"examine {path}", exc) from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketDirError(f"{path} exists and is not a socket; remove it or choose another")
        if _accepts(path):
            # We hold the lock, so no aemagent daemon serves this socket; a systemd socket unit
            # (whose service this connection may just have started) or an agent too old to lock.
            raise AlreadyRunning(
                path, None, who="a listener that holds no lock (systemd's socket?)"
            )
    import trio  # here, so `aemagent start` can check directories without importing trio

    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _cannot(f"remove the leftover {temporary}", exc) from None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    step = f"bind a socket at {temporary}"
    try:
        old_umask = os.umask(0o177)
        try:
            await sock.bind(temporary)
        finally:
            os.umask(old_umask)
        step = f"listen on {temporary}"
        sock.listen(LISTEN_BACKLOG)
        step = f"chmod {temporary}"
        os.chmod(temporary, 0o600)
        step = f"rename {temporary} to {path}"
        os.rename(temporary, path)
    except BaseException as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):  # a read-only directory, EADDRINUSE, ...: one line
            raise _cannot(step, exc) from None
        raise
    ident = identity(path)
    assert ident is not None
    return sock, ident


def _cannot(step: str, exc: OSError) -> SocketDirError:
    return SocketDirError(f"cannot {step}: {exc.strerror or exc}")


# macOS refuses a connection (ECONNREFUSED) when the listener's backlog is full, where Linux
# says EAGAIN: there a refusal is asked again this many times, this far apart (~100 ms in all),
# before the socket counts as stale.
_DARWIN_REFUSED_RETRIES, _DARWIN_REFUSED_PAUSE = 5, 0.02


def _accepts(path: str, *, platform: str | None = None) -> bool:
    """Whether something listens on the socket at `path` (stale sockets refuse connections)."""
    platform = platform or sys.platform
    retries = _DARWIN_REFUSED_RETRIES if platform == "darwin" else 0
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(_DARWIN_REFUSED_PAUSE)  # only before replacing a socket on macOS
        answer = _connect_once(path)
        if answer is not None:
            return answer
    return False


def _connect_once(path: str) -> bool | None:
    """True if something listens at `path`, False if nothing ever will (no file), None if the
    connection was refused (stale, or a full backlog on macOS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return None
        except FileNotFoundError:
            return False
        except BlockingIOError:  # a full backlog (Linux): very much alive
            return True
        except OSError as exc:
            raise SocketDirError(
                f"cannot tell whether something listens on {path} ({exc.strerror}); remove it"
                " or choose another --socket path"
            ) from None
    return True


def inherited_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening socket a service manager passed us (sd_listen_fds(3)), or None.

    Takes fd 3 when `LISTEN_PID` is our PID and `LISTEN_FDS` is 1, checks that it is a listening
    AF_UNIX stream socket bound to an absolute path, and marks it close-on-exec. The variables are
    removed either way, so children (a profile's `command`) never see them.
    """
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", None), env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None:
        return None
    if pid.strip() != str(os.getpid()):
        return None  # meant for another process (the one that exec'd us, say)
    if count.strip() != "1":
        raise SocketDirError(
            f"socket activation passed LISTEN_FDS={count} sockets; aemagent serves exactly one"
            " (one ListenStream= in aemagent.socket)"
        )
    fd = SD_LISTEN_FDS_START
    try:
        sock = socket.socket(fileno=fd)  # Linux reads family and type from the descriptor
    except OSError as exc:
        raise SocketDirError(
            f"socket activation: descriptor {fd} is not a socket ({exc.strerror})"
        ) from None
    sock.set_inheritable(False)
    problem = _unusable(sock)
    if problem:
        sock.close()
        raise SocketDirError(f"socket activation: descriptor {fd} is {problem}")
    return sock


def _unusable(sock: socket.socket) -> str:
    """What makes an inherited socket unfit to serve on, or '' if nothing."""
    if sock.family != socket.AF_UNIX:
        family = getattr(sock.family, "name", sock.family)
        return f"a {family} socket, not AF_UNIX (ListenStream= needs a path)"
    if sock.type != socket.SOCK_STREAM:
        kind = getattr(sock.type, "name", sock.type)
        return f"a {kind} socket, not SOCK_STREAM (use ListenStream=)"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "a socket that does not listen (aemagent.socket needs Accept=no)"
    name = sock.getsockname()
    if not isinstance(name, str) or not name.startswith("/"):
        # The lock lives next to the socket file, and the displacement check watches it.
        return (
            f"bound to {name!r}, not to an absolute path in the file system; aemagent needs a"
            " socket file"
        )
    return ""


# <sys/ucred.h>: struct xucred { u_int cr_version; uid_t cr_uid; short cr_ngroups;
# gid_t cr_groups[NGROUPS]; }, 76 bytes, read at SOL_LOCAL (0), LOCAL_PEERCRED (1).
_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_VERSION, _XUCRED_SIZE = 0, 0x001, 0, 76
_UCRED = struct.Struct("3i")  # Linux SO_PEERCRED: struct ucred { pid_t; uid_t; gid_t; }


def peer_uid(sock: trio.socket.SocketType, *, platform: str | None = None) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None if unknown (the peer
    gone, or an answer of a size or version we do not know: the caller refuses it)."""
    platform = platform or sys.platform
    try:
        if platform.startswith("linux"):
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            if len(raw) != _UCRED.size:
                return None
            _pid, uid, _gid = _UCRED.unpack(raw)
            return int(uid)
        if platform == "darwin":
            raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERCRED, _XUCRED_SIZE)
            if len(raw) != _XUCRED_SIZE:
                return None
            version, uid = struct.unpack_from("=II", raw)
            if version != _XUCRED_VERSION:
                return None
            return int(uid)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EINVAL, errno.EBADF):
            raise
    return None
