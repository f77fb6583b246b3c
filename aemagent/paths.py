"""Where the agent's socket lives: the one function the daemon and every client use.

Order (README, "Finding the agent"): an explicit path, else `$AEMAGENT_SOCK`, else a fixed
per-user default, so that cron jobs, GUI apps and tmux after a reattach find the agent without any
environment.

aem-token imports this module on its hot path: `os`, `stat` and `sys` only (all loaded at
interpreter start), and no `from __future__ import annotations` (importing `__future__` is not
free, and the annotations here evaluate fine on Python 3.11 as they are).
"""

import os
import stat
import sys

SOCKET_NAME = "agent.sock"
# macOS limits sun_path to 104 bytes; stay well under it so that `.tmp` names beside it fit too.
DARWIN_MAX_PATH = 100


def default_socket_path(
    *,
    uid: int | None = None,
    environ: dict[str, str] | None = None,
    platform: str | None = None,
    run_user_base: str = "/run/user",
    darwin_temp_dir: str | None = None,
) -> str:
    """The per-user default socket path; every keyword is there for tests to inject
    (`darwin_temp_dir` stands for what confstr answers)."""
    if uid is None:
        uid = os.getuid()
    if platform is None:
        platform = sys.platform
    env = os.environ if environ is None else environ
    fallback = f"/tmp/aemagent-{uid}/{SOCKET_NAME}"  # noqa: S108 (a per-user dir, checked by the daemon)
    if platform == "darwin":
        base = _darwin_user_temp_dir(env.get("TMPDIR", ""), uid, darwin_temp_dir)
        if base.startswith("/"):
            path = _join(base, "aemagent", SOCKET_NAME)
            if len(os.fsencode(path)) < DARWIN_MAX_PATH:
                return path
        return fallback
    # The XDG base directory spec says a relative path must be ignored.
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/"):
        return _join(runtime, "aemagent", SOCKET_NAME)
    # No XDG_RUNTIME_DIR (cron, `sudo -u`, ssh without pam_systemd): use the directory
    # pam_systemd would have named, but only if it really is this user's private directory.
    run_user = _join(run_user_base, str(uid))
    if _is_private_dir(run_user, uid):
        return _join(run_user, "aemagent", SOCKET_NAME)
    return fallback


def socket_path(explicit: str | None = None, environ: dict[str, str] | None = None) -> str:
    """`explicit` (`--socket`), else `$AEMAGENT_SOCK` if set and non-empty, else the default."""
    if explicit:
        return explicit
    env = os.environ if environ is None else environ
    return env.get("AEMAGENT_SOCK", "") or default_socket_path(environ=environ)


def lock_path(sock: str) -> str:
    """The daemon's lifetime lock file, next to the socket."""
    return sock + ".lock"


def _join(base: str, *names: str) -> str:
    # Not os.path.join's rules, not pathlib (import time): `base` is absolute, `names` are plain.
    return "/".join((base.rstrip("/"), *names))


def _is_private_dir(path: str, uid: int) -> bool:
    """A real directory (not a symlink) owned by `uid` with mode 0700."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o700


def _is_closed_dir(path: str, uid: int) -> bool:
    """A real directory owned by `uid` that no other user can write to."""
    try:
        st = os.lstat(path.rstrip("/") or "/")
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022


# confstr(3) name on Darwin (<unistd.h>); CPython's os.confstr_names does not list it.
_CS_DARWIN_USER_TEMP_DIR = 65537
# Where launchd's per-user temporary directories live (`/var/folders/xx/…/T/`).
_DARWIN_TEMP_ROOTS = ("/var/folders/", "/private/var/folders/")


def _darwin_user_temp_dir(tmpdir: str, uid: int, answer: str | None = None) -> str:
    """The user's private temporary directory, `/var/folders/xx/…/T/`, or "".

    `$TMPDIR` first, but only as launchd sets it (under /var/folders, ours, closed to others):
    reading it costs nothing, whereas a TMPDIR of the user's own choosing is not what a GUI app
    or a cron job sees, and every process of the user must find the same path. Otherwise
    `confstr(_CS_DARWIN_USER_TEMP_DIR)`, the same answer for every process of the user
    (`answer` stands in for it in tests).
    """
    if tmpdir.startswith(_DARWIN_TEMP_ROOTS) and _is_closed_dir(tmpdir, uid):
        return tmpdir
    if answer is not None:
        return answer
    name = os.confstr_names.get("CS_DARWIN_USER_TEMP_DIR", _CS_DARWIN_USER_TEMP_DIR)
    try:
        return os.confstr(name) or ""
    except (ValueError, OSError):  # not macOS
        return ""
