"""The agent's socket file: a private directory, a lifetime lock, an atomic appearance.

* The directory must be a real directory, ours or root's, that no other user can write to; we
  create it 0700 (like ssh-agent's), and refuse one that is not, naming path, owner and mode.
* `flock` on `<socket>.lock` is held for the daemon's whole life: a socket whose lock nobody
  holds is stale and may be replaced; one whose lock is held belongs to a live daemon, however
  slow, and is never touched.
* The socket is bound under a temporary name, listens, and only then is renamed into place, so
  the path never names a socket that refuses connections. An existing socket is replaced only
  when connecting to it is refused (stale; on macOS, which also refuses when a live listener's
  backlog is full, refused a few times over a moment); one that accepts belongs to a listener
  that holds no lock, such as a systemd socket unit, and is left alone.
* `peer_uid` names the user at the other end of a connection, which the server checks before
  reading a byte.

Socket activation (systemd binds the socket) is in systemd.py, the watch that notices the socket
file removed or replaced in watch.py.
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
from typing import TYPE_CHECKING

from aemagent.errors import AlreadyRunning, SocketDirError
from aemagent.paths import lock_path

if TYPE_CHECKING:
    import trio

# Linux allows 108 bytes in sun_path (107 plus NUL), macOS 104.
MAX_SOCKET_PATH = 103 if sys.platform == "darwin" else 107
LISTEN_BACKLOG = 1024


def _owner_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ensure_private_dir(
    directory: str, *, what: str = "socket directory", other: str = "another --socket path"
) -> None:
    """Create `directory` 0700 if missing; refuse it unless a real directory, ours (or root's),
    that no other user can write to.

    Reading or entering it is not refused (a socket in a 0755 home is fine, as for ssh-agent
    -a and OpenSSH's StrictModes): the socket is 0600 and every connection's uid is checked.
    What matters is who can change its entries, i.e. remove, rename or create names in it: with
    write access another user could put their own socket at our path (an impostor that clients
    would send credentials to) or take the lock's or the temporary name first. The sticky bit
    (/tmp) protects names that exist, not names still to be created, so it is no exception.
    Root may own it: root can do anything to us anyway. `what` and `other` name the directory
    and the way out in the messages (a token file's directory, daemon/sinks.py, is checked too)."""
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise SocketDirError(
            f"cannot create {what} {directory}: its parent does not exist"
        ) from None
    except OSError as exc:
        raise SocketDirError(f"cannot create {what} {directory}: {exc.strerror}") from None
    st = os.lstat(directory)
    me = os.getuid()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        raise SocketDirError(
            f"{what} {directory} is a symbolic link (owner {_owner_name(st.st_uid)},"
            f" mode {mode:04o}), not a directory of its own; remove it or choose {other}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(
            f"{what} {directory} is not a directory (owner {_owner_name(st.st_uid)},"
            f" mode {mode:04o}); remove it or choose {other}"
        )
    if st.st_uid not in (me, 0):
        raise SocketDirError(
            f"{what} {directory} belongs to {_owner_name(st.st_uid)}, not to"
            f" {_owner_name(me)} (mode {mode:04o}); remove it or choose {other}"
        )
    if mode & 0o022:
        if mode & stat.S_ISVTX:  # /tmp: they cannot remove our names, but can take them first
            hint = (
                "the sticky bit does not stop them taking the socket's name first; put it in a"
                f" directory of its own, such as {os.path.join(directory, f'aemagent-{me}')}/"
            )
        else:
            hint = f"run `chmod go-w {directory}` or choose {other}"
        raise SocketDirError(
            f"{what} {directory} is writable by other users (mode {mode:04o}, owner"
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
# says EAGAIN: there a refusal is asked again this many times, this far apart, before the socket
# counts as stale.
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
