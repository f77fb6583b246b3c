"""The daemon: one trio task tree serving the agent's API on its Unix socket.

Theory of operation
-------------------
`serve_agent` first installs its signal receiver (so a SIGTERM that arrives once the socket
exists still stops the daemon cleanly), takes the lifetime lock, binds the socket (unixsocket.py)
or takes the one systemd passed (socket activation, systemd.py), starts the `Agent`, and reports
ready only once the socket accepts. Under one nursery then run:

* the accept loop, which holds a slot of the connection cap before each `accept` (excess clients
  wait in the kernel's backlog) and checks the peer's uid before reading a byte;
* the signal watcher (SIGTERM/SIGINT stop, SIGHUP reloads);
* the socket watcher (watch.py): if the socket file is removed or replaced, another daemon (or a
  restarted systemd socket unit) owns the path now, and we exit 0 so a service manager does not
  fight it (gpg-agent does the same). It wakes when the socket's directory changes (inotify, on
  Linux: at once) and otherwise only on the one-minute grid the agent's timers share
  (`clocks.on_grid`), the only check where inotify is unavailable (within a minute);
* under systemd (`$NOTIFY_SOCKET`), the status reporter: `STATUS=` with the profile count,
  recomputed on that same grid and after requests, at most once a second.

An idle daemon thus wakes once a minute, for every timer at once.

Stopping: `STOPPING=1`, stop accepting, remove the socket (if it is still ours and we bound it:
an activated socket belongs to systemd), give connections in flight a short grace period, cancel
the rest. Nothing is written to disk but the socket and its lock (token files, sinks.py, go
to a memory file system unless a sink allows disk; they are removed as the nursery ends).

`run` is `aemagent serve`: it hardens the process first (hardening.py).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field, replace

import trio

from aemagent import __version__
from aemagent.core.agent import Agent
from aemagent.core.clocks import Clock, SystemClock, on_grid
from aemagent.daemon.api import AgentAPI
from aemagent.daemon.config import Config
from aemagent.daemon.hardening import harden_process
from aemagent.daemon.httpserver import Limits, Request, Response, SocketIO, serve_http
from aemagent.daemon.sinks import Sinks
from aemagent.daemon.sources import ConfigProfiles
from aemagent.daemon.systemd import Notifier, inherited_socket
from aemagent.daemon.unixsocket import (
    LifetimeLock,
    bind_socket,
    ensure_private_dir,
    identity,
    peer_uid,
)
from aemagent.daemon.watch import until_displaced
from aemagent.errors import AemAgentError, AlreadyRunning
from aemagent.ims.client import IMSClient

log = logging.getLogger("aemagent.daemon")

# accept() errors that mean "out of resources for now", not "broken": wait and retry.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors about one connection that died before it was accepted: take the next one.
_ACCEPT_TRANSIENT_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}
# Under systemd, STATUS= is recomputed (O(profiles)) at most once in this many seconds, however
# many requests ask for it; otherwise on the agent's one-minute grid (a token expiring changes it).
_STATUS_MIN_GAP = 1.0


@dataclass(frozen=True)
class DaemonSettings:
    socket_path: str
    config: Config = field(default_factory=Config)
    max_connections: int = 1024
    # Connections still busy when a stop is asked for get this long to finish.
    shutdown_grace: float = 2.0
    # Besides waking on changes in its directory (inotify), the daemon checks that its socket
    # file is still its own on a grid of this period: the only check where inotify is
    # unavailable. The agent's wake_interval, so that it costs no wake-up of its own.
    watch_poll_interval: float = 60.0
    limits: Limits = field(default_factory=Limits)
    # Socket activation: the listening socket systemd bound at `socket_path` (never unlinked).
    listener: socket.socket | None = None
    # sd_notify(3): where READY=1, STATUS= and STOPPING=1 go ($NOTIFY_SOCKET), if anywhere.
    notify_socket: str | None = None

    def __post_init__(self) -> None:
        # Absolute once, here: the daemon compares and removes this path at exit.
        object.__setattr__(self, "socket_path", os.path.abspath(self.socket_path))

    def from_service_manager(
        self, environ: MutableMapping[str, str] | None = None
    ) -> DaemonSettings:
        """These settings plus what systemd passed in the environment (removed from it, so that
        children do not inherit it): an activated socket, whose path wins, and $NOTIFY_SOCKET."""
        env = os.environ if environ is None else environ
        notify = env.pop("NOTIFY_SOCKET", None) or None
        listener = inherited_socket(env)
        if listener is None:
            return replace(self, notify_socket=notify)
        path = listener.getsockname()
        if path != self.socket_path:
            log.info("socket activation: serving on %s (not %s)", path, self.socket_path)
        return replace(self, socket_path=path, listener=listener, notify_socket=notify)


class _Server:
    def __init__(
        self,
        settings: DaemonSettings,
        agent: Agent,
        profiles: ConfigProfiles,
        notifier: Notifier,
    ) -> None:
        self.settings = settings
        self.agent = agent
        self.profiles = profiles
        self.notifier = notifier
        self.api = AgentAPI(agent, shutdown=self.request_stop, config_profiles=profiles)
        self.stop_requested = trio.Event()
        self.displaced = False
        self._slots = trio.Semaphore(settings.max_connections)
        self.accepting = trio.CancelScope()
        self._uid = os.getuid()
        self._status_due = trio.Event()

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        with self.accepting:
            await self._accept_forever(sock, nursery)

    async def _accept_forever(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno in _ACCEPT_TRANSIENT_ERRNOS:
                    continue  # that client gave up already
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("accept: %s; waiting for connections to close", os.strerror(exc.errno))
                await trio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._connection, conn)

    async def _connection(self, conn: trio.socket.SocketType) -> None:
        """One client, start to end. Whatever goes wrong here ends this connection only (one
        line in the log), never the daemon: an exception out of a task kills the nursery."""
        try:
            uid = peer_uid(conn)
            if uid is None or uid not in (self._uid, 0):
                # Closed without reading a byte: another user gets nothing to talk to.
                who = "an unknown uid" if uid is None else f"uid {uid}"
                log.warning("refused a connection from %s", who)
                return
            # A bare trio socket, not trio.SocketStream: see httpserver's docstring.
            await serve_http(SocketIO(conn), self._handle, self.settings.limits)
        except Exception as exc:
            log.warning("closed a connection after an error: %s", _one_line(exc))
        finally:
            conn.close()
            self._slots.release()

    async def _handle(self, request: Request) -> Response:
        try:
            return await self.api(request)
        finally:
            self._status_due.set()  # cheap: the reporter sends only what changed

    async def watch_signals(self, signals: AsyncIterator[int], nursery: trio.Nursery) -> None:
        # SIGHUPs go to one reloader task through a buffer of one: a reload runs, at most one
        # waits, and SIGHUPs meanwhile are that one (it reads the config file when it starts).
        wanted, reloads = trio.open_memory_channel[None](1)
        nursery.start_soon(self._reload, reloads)
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    wanted.send_nowait(None)
                except trio.WouldBlock:
                    log.info("SIGHUP: a reload of %s is already due", self.profiles.config.path)
                else:
                    log.info("SIGHUP: reloading %s", self.profiles.config.path)
                continue
            log.info("%s: stopping", signal.Signals(signum).name)
            self.request_stop()

    async def _reload(self, reloads: trio.MemoryReceiveChannel[None]) -> None:
        async for _ in reloads:
            with contextlib.suppress(AemAgentError):  # a bad config file: logged, nothing changed
                await self.profiles.reload()
            self._status_due.set()

    async def load_profiles(self) -> None:
        await self.profiles.load()
        self._status_due.set()

    def status(self) -> str:
        """One line for `systemctl status`: how many profiles, in which states."""
        now = self.agent.now()
        states: dict[str, int] = {}
        for profile in self.agent.profiles():
            state = profile.state(now)
            states[state] = states.get(state, 0) + 1
        total = sum(states.values())
        if not total:
            return "no profiles; add one with `aemagent add FILE`"
        counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        return f"{total} profile{'' if total == 1 else 's'}: {counts}"

    async def report_status(self) -> None:
        """Send STATUS= whenever it changes, at a cost that does not grow with the traffic.

        The line is recomputed (O(profiles)) after requests, loads and reloads (`_status_due`),
        but at most once every `_STATUS_MIN_GAP` seconds: a burst of token requests costs one
        recomputation a second, not one each. While any profile is refreshing, once a second
        until none is (a fetch ends without a request). Otherwise on the one-minute grid the
        agent's timers share (a token expiring, a refresh of the timer's own), so an idle
        daemon does not wake for it at an instant of its own."""
        period = self.agent.settings.wake_interval
        sent = None
        while True:
            # A request that ends from here on sets the new event: nothing is missed.
            self._status_due = trio.Event()
            computed = trio.current_time()
            line = self.status()
            if line != sent:
                self.notifier.send(f"STATUS={line}")
                sent = line
            deadline = on_grid(computed, period, period)
            if any(profile.flight is not None for profile in self.agent.profiles()):
                deadline = min(deadline, computed + _STATUS_MIN_GAP)
            with trio.move_on_at(deadline):
                await self._status_due.wait()
            if trio.current_time() < computed + _STATUS_MIN_GAP:  # else no extra checkpoint
                await trio.sleep_until(computed + _STATUS_MIN_GAP)

    async def watch_socket(self, path: str, ours: tuple[int, int]) -> None:
        """Stop, as displaced, once the socket file is no longer ours (watch.py)."""
        await until_displaced(path, ours, self.settings.watch_poll_interval)
        log.warning("socket %s was removed or replaced: another agent owns it; exiting", path)
        self.displaced = True
        self.request_stop()


async def serve_agent(
    settings: DaemonSettings,
    *,
    clock: Clock | None = None,
    ims: IMSClient | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the agent on `settings.socket_path` until stopped; reports the path when ready."""
    # Before the socket can appear: from then on a SIGTERM must mean a clean stop (socket
    # removed), not the default action's death with a stale socket left behind.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        await _serve(settings, signals, clock, ims, task_status)


async def _serve(
    settings: DaemonSettings,
    signals: AsyncIterator[int],
    clock: Clock | None,
    ims: IMSClient | None,
    task_status: trio.TaskStatus[str],
) -> None:
    path = settings.socket_path
    activated = settings.listener is not None
    notifier = Notifier(settings.notify_socket)
    ensure_private_dir(os.path.dirname(path))
    lock = LifetimeLock(path)
    clock = clock or SystemClock()
    own_ims = ims is None
    config = settings.config
    ims = ims or IMSClient(
        clock=clock,
        timeout=config.ims_timeout,
        proxy=config.proxy_for_daemon(os.environ),
        ca_file=config.ca_file,
    )
    try:
        if settings.listener is not None:
            sock = trio.socket.from_stdlib_socket(settings.listener)
            # systemd's socket file: its identity now is what the watcher keeps checking.
            ours = identity(path)
        else:
            sock, ours = await bind_socket(path)
        agent = Agent(
            ims, clock=clock, settings=config.policy, ims_concurrency=config.ims_concurrency
        )
        profiles = ConfigProfiles(agent, config)
        server = _Server(settings, agent, profiles, notifier)

        def remove_socket() -> None:
            # Only a socket we bound, and only while the file is still that socket.
            if not activated and not server.displaced and identity(path) == ours:
                with contextlib.suppress(OSError):
                    os.unlink(path)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.watch_signals, signals, nursery)
                await nursery.start(agent.run)
                sinks = Sinks(agent)  # token files: removed when this nursery ends
                await nursery.start(sinks.run)
                nursery.start_soon(sinks.follow, profiles)
                profiles.reserve()  # config profiles exist (as "loading") before we serve
                nursery.start_soon(server.load_profiles)
                closing, drained = trio.Event(), trio.Event()
                connections = await nursery.start(_serve_connections, closing, drained)
                nursery.start_soon(server.accept_loop, sock, connections)
                if ours is None:
                    log.warning("socket %s does not exist (any more); exiting", path)
                    server.displaced = True
                    server.request_stop()
                else:
                    nursery.start_soon(server.watch_socket, path, ours)
                how = " (socket activation)" if activated else ""
                log.info(
                    "aemagent %s serving on %s%s (pid %d)", __version__, path, how, os.getpid()
                )
                notifier.send("READY=1")
                if notifier:
                    nursery.start_soon(server.report_status)
                task_status.started(path)
                await server.stop_requested.wait()
                notifier.send("STOPPING=1")
                server.accepting.cancel()  # no new connections
                await trio.lowlevel.checkpoint()
                sock.close()
                remove_socket()
                connections.cancel_scope.deadline = trio.current_time() + settings.shutdown_grace
                closing.set()
                await drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            remove_socket()
            log.info("stopped")
    finally:
        if own_ims:
            with trio.CancelScope(shield=True):
                await ims.aclose()
        lock.release()


async def _serve_connections(
    closing: trio.Event,
    drained: trio.Event,
    *,
    task_status: trio.TaskStatus[trio.Nursery],
) -> None:
    """The connection handlers' nursery: outlives the accept loop, so a stop can drain it."""
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await closing.wait()
        # Leaving the block waited for the handlers (until the grace deadline).
    finally:
        drained.set()


def _one_line(exc: BaseException) -> str:
    """What went wrong, for a log line: the exception's type and, for an OSError, its errno's
    text; never its arguments, which could quote what a client sent."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__} ({exc.strerror or errno.errorcode.get(exc.errno or 0, '?')})"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_one_line(e) for e in exc.exceptions)
    kind = type(exc)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def run(settings: DaemonSettings) -> int:
    """`aemagent serve`: run in the foreground; the exit code for the process."""
    notifier = Notifier(os.environ.get("NOTIFY_SOCKET") or None)
    try:
        settings = settings.from_service_manager()  # first: no child may see LISTEN_FDS
        harden_process()
        trio.run(serve_agent, settings)
    except AlreadyRunning as exc:
        log.info("%s; not starting another", exc)
        # For systemd, "started" and then a clean exit: a failure would be restarted, and the
        # restarted one would find the same agent.
        notifier.send(f"READY=1\nSTATUS={exc}; not starting another")
        return 0
    except AemAgentError as exc:
        log.error("%s", exc)
        notifier.send(f"STATUS={exc}")
        return 1
    except OSError as exc:  # at start, before serving (each step says its own): one line
        message = f"cannot start: {exc.strerror or exc}" + (
            f" ({exc.filename})" if exc.filename else ""
        )
        log.error("%s", message)
        notifier.send(f"STATUS={message}")
        return 1
    return 0
