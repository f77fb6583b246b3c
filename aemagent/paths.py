"""Where the agent's socket lives: the one function the daemon and every client use.

Order (CONTRACT.md, "Finding the agent"): an explicit path, else `$AEMAGENT_SOCK`, else a fixed
per-user default, so that cron jobs, GUI apps and tmux after a reattach find the agent without any
environment (LESSONS.md row 1).

aem-token imports this module on its hot path: `os`, `stat` and `sys` only (all loaded at
interpreter start), and no `from __future__ import annotations` (importing `__future__` costs
0.3 ms; the annotations here evaluate fine on Python 3.11 as they are).
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
    """The per-user default socket path; every keyword is there for tests to inject."""
    if uid is None:
        uid = os.getuid()
    if platform is None:
        platform = sys.platform
    fallback = f"/tmp/aemagent-{uid}/{SOCKET_NAME}"  # noqa: S108 (a per-user dir, checked by the daemon)
    if platform == "darwin":
        base = darwin_temp_dir if darwin_temp_dir is not None else _darwin_user_temp_dir()
        if base.startswith("/"):
            path = _join(base, "aemagent", SOCKET_NAME)
            if len(os.fsencode(path)) < DARWIN_MAX_PATH:
                return path
        return fallback
    # The XDG base directory spec says a relative path must be ignored.
    runtime = (os.environ if environ is None else environ).get("XDG_RUNTIME_DIR", "")
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


def _darwin_user_temp_dir() -> str:
    """`confstr(_CS_DARWIN_USER_TEMP_DIR)`: `/var/folders/xx/…/T/`, private to the user."""
    try:
        return os.confstr("CS_DARWIN_USER_TEMP_DIR") or ""
    except (ValueError, OSError):  # not macOS, or no such configuration name
        return ""
