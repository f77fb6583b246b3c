"""Token files: `[[sink]]`s of the config file, kept holding their profile's current token.

    [[sink]]
    profile = "p12345-e67890"
    path = "/run/user/1000/aem/token"   # on a tmpfs
    format = "token"                    # or "header", "json": what `aem-token --format` prints
    mode = 0o600                        # the default; or "0640"

Each sink is one task. It writes the file whenever its profile gets a new token, removes it when
the profile is forgotten, replaced (until the new credential has a token: the old identity's token
must not stand for the new one) or its token is dropped, when the sink leaves the config, and when
the daemon stops (SIGTERM included; a SIGKILL leaves it behind). A name that no profile holds yet
is waited for (`Agent.published`). A file is removed only while it is still the one we wrote.

A write is a new file beside the target (O_CREAT|O_EXCL|O_NOFOLLOW, the sink's mode, fchmod'ed
against the umask), then a rename: a reader sees the old token or the new one, never a part. No
fsync: on a memory file system it means nothing, and after a crash the token in the file is stale
anyway.

The agent writes no token to disk: a sink's directory must be on a memory file system (tmpfs,
ramfs: `statfs(2)`'s f_type on Linux, f_fstypename on macOS, which has no tmpfs of its own: a RAM
disk made with hdiutil is an apfs or hfs volume, so there a sink needs `allow_disk = true`)
unless the sink says `allow_disk = true`. The directory must exist and be ours or root's, and no
other user may write to it (the socket directory's rule, unixsocket.py). Both are checked when the
config is loaded (a config error) and again before each write (an error in the log; the sink
tries again at the next token). A sink never stops the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
import stat
import sys
from collections.abc import Callable

import trio

from aemagent.core.agent import Agent
from aemagent.core.profiles import Profile, Served
from aemagent.credentials import Secret
from aemagent.daemon.config import SinkSpec
from aemagent.daemon.sources import ConfigProfiles
from aemagent.daemon.views import token_json
from aemagent.errors import AemAgentError, ConfigError, SocketDirError

log = logging.getLogger("aemagent.sinks")

# Linux statfs(2) f_type values (linux/magic.h): the two memory file systems, and names for the
# others an error message may have to show.
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_LINUX_NAMES = {
    TMPFS_MAGIC: "tmpfs",
    RAMFS_MAGIC: "ramfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x794C7630: "overlay",
    0x6969: "nfs",
    0xFF534D42: "cifs",
    0x65735546: "fuse",
    0x2FC12FC1: "zfs",
    0x4D44: "vfat",
    0x5346544E: "ntfs",
    0xF2F52010: "f2fs",
    0x01021997: "v9fs",
    0x62656572: "sysfs",
    0x9FA0: "proc",
}
MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")
# Room for struct statfs on every platform we run on (Linux x86_64: 120 bytes, macOS: 2168).
_STATFS_SIZE = 4096
# macOS struct statfs (64-bit inodes): f_fstypename[16] follows 12 fixed fields.
_DARWIN_FSTYPENAME = slice(72, 88)

StatFS = Callable[[bytes, ctypes.Array[ctypes.c_char]], int]


def _libc_statfs(platform: str) -> StatFS:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    function = None
    if platform == "darwin":
        with contextlib.suppress(AttributeError):
            function = libc["statfs$INODE64"]  # x86_64; arm64 has only the 64-bit-inode statfs
    function = function or libc.statfs
    function.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
    function.restype = ctypes.c_int
    return function


def filesystem_type(
    directory: str, *, platform: str | None = None, statfs: StatFS | None = None
) -> str:
    """The name of the file system `directory` is on ("tmpfs", "ext4", …); OSError if unknown."""
    platform = platform or sys.platform
    buffer = ctypes.create_string_buffer(_STATFS_SIZE)
    call = statfs or _libc_statfs(platform)
    if call(os.fsencode(directory), buffer) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), directory)
    raw = buffer.raw
    if platform == "darwin":
        return raw[_DARWIN_FSTYPENAME].split(b"\0", 1)[0].decode("ascii", "replace") or "unknown"
    # f_type is the first field, a C long (its low 32 bits hold the magic number).
    magic = ctypes.c_long.from_buffer_copy(buffer).value & 0xFFFFFFFF
    return _LINUX_NAMES.get(magic) or _mountinfo_type(directory) or f"file system 0x{magic:x}"


def _mountinfo_type(directory: str) -> str | None:
    """The fstype /proc/self/mountinfo gives the mount holding `directory` (the longest match)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    target, best, found = os.path.realpath(directory), -1, None
    for line in lines:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, found = len(point), line.split(" - ", 1)[1].split()[0]
    return found


def check_sink(
    sink: SinkSpec,
    config_path: str | None = None,
    *,
    fstype: Callable[[str], str] = filesystem_type,
) -> None:
    """ConfigError unless the sink's directory exists, is ours, and is on a memory file system
    (or the sink allows disk); its message names the sink's path and what is wrong."""
    prefix = f"{config_path}: " if config_path else ""
    directory = os.path.dirname(sink.path)
    where = f"{prefix}sink {sink.path}"
    if not os.path.isdir(directory):
        raise ConfigError(f"{where}: directory {directory} does not exist")
    _check_private(directory, where)
    if os.path.isdir(sink.path) and not os.path.islink(sink.path):
        raise ConfigError(f"{where}: is a directory")
    if sink.allow_disk:
        return
    try:
        kind = fstype(directory)
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot tell which file system {directory} is on ({exc.strerror});"
            " set allow_disk = true to allow it"
        ) from None
    if kind not in MEMORY_FILE_SYSTEMS:
        raise ConfigError(
            f"{where}: {directory} is on {kind}, not a memory file system (tmpfs/ramfs);"
            " set allow_disk = true to allow it"
        )


def _check_private(directory: str, where: str) -> None:
    """The socket directory's rule (ours or root's, no other user may write to it), said of a
    sink's directory. It exists: the check never creates one."""
    from aemagent.daemon.unixsocket import ensure_private_dir

    try:
        ensure_private_dir(directory, what="directory", other="another sink path")
    except SocketDirError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def render(served: Served, fmt: str) -> bytes:
    """The file's content: exactly what `aem-token --format FMT` prints, newline included."""
    token = served.token.reveal()
    if fmt == "token":
        return f"{token}\n".encode()
    if fmt == "header":
        return f"Authorization: Bearer {token}\n".encode()
    from aemagent.helper import format_json_answer

    return format_json_answer("json", token_json(served)).encode()


class SinkFile:
    """One sink's file: written by rename, removed only while it is still the one we wrote."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.written: tuple[int, int] | None = None  # (st_dev, st_ino) of our file

    def write(self, content: bytes) -> None:
        check_sink(self.spec)
        directory, name = os.path.split(self.spec.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        fd = os.open(temporary, flags, self.spec.mode)
        try:
            try:
                os.fchmod(fd, self.spec.mode)  # whatever the umask
                view = memoryview(content)
                while view:
                    view = view[os.write(fd, view) :]
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.spec.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self.written = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        if self.written is None:
            return
        written, self.written = self.written, None
        with contextlib.suppress(OSError):
            st = os.lstat(self.spec.path)
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == written:
                os.unlink(self.spec.path)


class Sinks:
    """The config's sinks, one task each, under the daemon's nursery."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._nursery: trio.Nursery | None = None
        self._tasks: dict[SinkSpec, trio.CancelScope] = {}
        self._wanted: tuple[SinkSpec, ...] = ()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; the files are removed as their tasks end."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.update(self._wanted)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def follow(self, profiles: ConfigProfiles) -> None:
        """Run the sinks of the config as each load and reload reads it."""
        while True:
            self.update(profiles.config.sinks)
            await profiles.config_read.wait()

    def update(self, specs: tuple[SinkSpec, ...]) -> None:
        """Run exactly these sinks: a sink that changed is the old one removed, a new one added."""
        self._wanted = specs
        if self._nursery is None:
            return
        for spec in list(self._tasks):
            if spec not in specs:
                self._tasks.pop(spec).cancel()
        for spec in specs:
            if spec not in self._tasks:
                scope = self._tasks[spec] = trio.CancelScope()
                self._nursery.start_soon(self._sink, spec, scope)

    async def _sink(self, spec: SinkSpec, scope: trio.CancelScope) -> None:
        sink = SinkFile(spec)
        with scope:
            try:
                await self._keep(sink)
            finally:
                sink.remove()
                if self._tasks.get(spec) is scope:
                    del self._tasks[spec]

    async def _keep(self, sink: SinkFile) -> None:
        spec = sink.spec
        shown: Secret | None = None  # the token the file holds
        holder: Profile | None = None
        failed: str | None = None
        while True:
            profile = self._agent.find(spec.profile)
            if profile is not holder:
                holder = profile
                if shown is not None:
                    log.info("sink %s: profile %s changed; file removed", spec.path, spec.profile)
                sink.remove()
                shown = None
            token = None if profile is None else profile.token
            if profile is not None and token is not None and token is not shown:
                try:
                    sink.write(render(self._served(profile, token), spec.format))
                except (OSError, AemAgentError) as exc:
                    text = str(exc) if isinstance(exc, AemAgentError) else _oserror(spec, exc)
                    if text != failed:  # once per distinct error, not at every token
                        log.error("%s", text)
                    failed = text
                    sink.remove()
                    shown = None
                else:
                    if failed is not None or shown is None:
                        log.info("sink %s: written (profile %s)", spec.path, spec.profile)
                    failed = None
                    shown = token
            elif token is None and shown is not None:
                sink.remove()
                shown = None
            if profile is None:
                await self._agent.published.wait()
            else:
                await profile.changed.wait()

    def _served(self, profile: Profile, token: Secret) -> Served:
        now = self._agent.now()
        times = profile.schedule.token
        remaining = 0.0 if times is None else times.remaining(now)
        return Served(profile, token, now.wall + remaining, remaining)


def _oserror(spec: SinkSpec, exc: OSError) -> str:
    return f"sink {spec.path}: cannot write it: {exc.strerror or exc}"
