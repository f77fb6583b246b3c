"""The agent's socket file: a private directory, a lifetime lock, an atomic appearance.

* The directory must be a real directory owned by us and closed to others (0700, like
  ssh-agent's); we create it so, and refuse one that is not, naming path, owner and mode.
* `flock` on `<socket>.lock` is held for the daemon's whole life: a socket whose lock nobody
  holds is stale and may be replaced; one whose lock is held belongs to a live daemon, however
  slow, and is never touched.
* The socket is bound under a temporary name, listens, and only then is renamed into place, so
  the path never names a socket that refuses connections. An existing socket is replaced only
  when connecting to it is refused (stale); one that accepts belongs to a listener that holds no
  lock, such as a systemd socket unit, and is left alone.
* Under socket activation (sd_listen_fds(3)) systemd binds the socket; `inherited_socket` takes
  it from fd 3 and names its path, so that the lock and the displacement check still apply.
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
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from aemagent.errors import SocketDirError
from aemagent.paths import lock_path

if TYPE_CHECKING:
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
        if _accepts(path):
            # We hold the lock, so no aemagent daemon serves this socket; a systemd socket unit
            # (whose service this connection may just have started) or an agent too old to lock.
            raise AlreadyRunning(
                path, None, who="a listener that holds no lock (systemd's socket?)"
            )
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


def _accepts(path: str) -> bool:
    """Whether something listens on the socket at `path` (stale sockets refuse connections)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:  # a full backlog: very much alive
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
