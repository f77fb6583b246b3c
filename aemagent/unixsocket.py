"""The agent's socket file: a private directory, a lifetime lock, an atomic appearance.

* The directory must be a real directory owned by us and closed to others (0700, like
  ssh-agent's); we create it so, and refuse one that is not, naming path, owner and mode.
* `flock` on `<socket>.lock` is held for the daemon's whole life: a socket whose lock nobody
  holds is stale and may be replaced; one whose lock is held belongs to a live daemon, however
  slow, and is never touched.
* The socket is bound under a temporary name, listens, and only then is renamed into place, so
  the path never names a socket that refuses connections.
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
from typing import TYPE_CHECKING

from aemagent.errors import SocketDirError
from aemagent.paths import lock_path

if TYPE_CHECKING:
    import trio

# Linux allows 108 bytes in sun_path (107 plus NUL), macOS 104.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
LISTEN_BACKLOG = 1024


class AlreadyRunning(Exception):
    """Another live daemon holds the lock for this socket path."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path, self.pid = path, pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"an agent ({who}) already serves {path}")


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ensure_private_dir(directory: str) -> None:
    """Create `directory` 0700 if missing; refuse it unless ours, a directory, and closed."""
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
    if st.st_uid != me:
        raise SocketDirError(
            f"socket directory {directory} belongs to {_owner_name(st.st_uid)}, not to"
            f" {_owner_name(me)} (mode {mode:04o}); remove it or choose another --socket path"
        )
    if mode & 0o077:
        raise SocketDirError(
            f"socket directory {directory} is open to other users (mode {mode:04o}, owner"
            f" {_owner_name(st.st_uid)}); run `chmod 700 {directory}`"
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
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

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
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketDirError(f"{path} exists and is not a socket; remove it or choose another")
    import trio  # here, so `aemagent start` can check directories without importing trio

    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            await sock.bind(temporary)
        finally:
            os.umask(old_umask)
        sock.listen(LISTEN_BACKLOG)
        os.chmod(temporary, 0o600)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    ident = identity(path)
    assert ident is not None
    return sock, ident


def peer_uid(sock: trio.socket.SocketType) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None if unknown."""
    try:
        if sys.platform.startswith("linux"):
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", raw)
            return int(uid)
        if sys.platform == "darwin":  # pragma: no cover - exercised on macOS only
            # struct xucred { u_int cr_version; uid_t cr_uid; ... } at SOL_LOCAL, LOCAL_PEERCRED
            raw = sock.getsockopt(0, 0x001, 76)
            return int(struct.unpack_from("I", raw, 4)[0])
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.EINVAL, errno.EBADF):
            raise
    return None
