"""Starting the daemon in the background and waiting for it, for `aemagent start` and `stop`.

The child is spawned with `setsid` and its stdio on /dev/null and a 0600 log file, so nothing
ties it to the terminal and `eval "$(aemagent start)"` returns as soon as we do. We return once
its socket serves (or a racing `start` won the lifetime lock and its daemon serves), and say
which of the two happened. A child of ours that lost is killed and reaped before we return, so
once every `start` has returned exactly one daemon runs for the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

from aemagent import exits
from aemagent.errors import AgentUnreachable, LaunchError, WireError
from aemagent.wire import request

_POLL = 0.02
# A log bigger than this is moved aside to `agent.log.1` when a new daemon starts.
_MAX_LOG_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class Launched:
    pid: int  # the agent that serves the path now
    spawned: bool  # whether it is the daemon we spawned (not a racing `start`'s, not systemd's)


def agent_pid(path: str) -> int | None:
    """The PID of the live agent serving `path`, or None if none answers."""
    try:
        reply = request(path, "GET", "/v1/health", read_timeout=5.0)
        health = json.loads(reply.body)
    except (AgentUnreachable, WireError, ValueError):
        return None
    if reply.status != 200 or not isinstance(health, dict):
        return None
    pid = health.get("pid")
    return pid if isinstance(pid, int) else None


def log_file_path() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_state_dir("aemagent"), "agent.log")


def _open_log(path: str) -> int:
    """The daemon's log, for appending; a symbolic link there is refused, not followed.

    The log could otherwise be pointed at any file of ours (O_NOFOLLOW), and a link is not
    rotated either (lstat). Every failure is a one-line LaunchError naming the path.
    """
    import errno
    import stat

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size > _MAX_LOG_BYTES:
                os.replace(path, path + ".1")
        # O_NONBLOCK: a FIFO planted there fails at once (ENXIO) instead of hanging `start`.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (os.path.islink(path) and exc.errno == errno.EMLINK):
            why = "it is a symbolic link; remove it, the agent creates its own"
        else:
            why = exc.strerror or str(exc)
        raise LaunchError(f"cannot open the agent's log file {path}: {why}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            os.set_blocking(fd, True)
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise LaunchError(f"the agent's log file {path} is not a regular file; remove it")
    return fd


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def spawn_daemon(
    path: str, *, timeout: float, log_level: str | None = None, config: str | None = None
) -> Launched:
    """Start `aemagent serve` detached; return the agent that then serves `path`."""
    from aemagent.daemon.unixsocket import ensure_private_dir, lock_is_held

    ensure_private_dir(os.path.dirname(os.path.abspath(path)))  # a clear error here, not in a log
    log_path = log_file_path()
    # -P: the daemon imports the aemagent we are, not an `aemagent/` in the current directory.
    argv = [sys.executable, "-P", "-m", "aemagent", "serve", "--socket", path]
    if log_level:
        argv += ["--log-level", log_level]
    if config:
        argv += ["--config", os.path.abspath(config)]

    def spawn() -> int:
        log_fd = _open_log(log_path)
        try:
            return os.posix_spawn(
                sys.executable,
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 1),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(log_fd)

    child: int | None = spawn()
    spawned = {child}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = agent_pid(path)
        if pid is not None:
            if child is not None and child != pid:
                _dismiss(child)  # it lost the race; it must not serve later, unannounced
            return Launched(pid, spawned=pid in spawned)
        if child is not None:
            done, status = os.waitpid(child, os.WNOHANG)
            if done:
                child = None
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    said = _last_line(log_path).removeprefix("aemagent: ")
                    raise LaunchError(
                        f"the agent exited with code {code}: {said} (log: {log_path})",
                        # a usage error stays one
                        exits.USAGE if code == exits.USAGE else exits.UNEXPECTED,
                    )
                # Exit 0 before serving: a live daemon holds the lock. Usually another `start`
                # won the race and its agent answers soon; but it may be one whose socket file
                # was removed, which exits within its watch interval without serving.
        elif not lock_is_held(path):
            child = spawn()  # the lock holder left without serving: try again
            spawned.add(child)
        time.sleep(_POLL)
    raise LaunchError(f"the agent did not answer on {path} within {timeout:g} s (log: {log_path})")


def _dismiss(child: int) -> None:
    """Kill and reap a daemon we spawned that did not win: another agent serves the path.

    A losing child may still be importing, long after the winner answers. Left alone it would
    find the lock held and exit, unless the winner died first: then it would take the lock and
    serve as an agent nobody was told about. It holds nothing yet (the winner holds the lock),
    so SIGKILL loses nothing; it is reaped here so that it is gone when `start` returns.
    """
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)


def wait_until_gone(path: str, timeout: float) -> bool:
    """Wait until no agent answers on `path` and its lifetime lock is free."""
    from aemagent.daemon.unixsocket import lock_is_held

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent_pid(path) is None and not lock_is_held(path):
            return True
        time.sleep(_POLL)
    return False
