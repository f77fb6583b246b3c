"""The daemon: one trio task tree serving the agent's API on its Unix socket.

Theory of operation
-------------------
`serve_agent` takes the lifetime lock, binds the socket (unixsocket.py), starts the `Agent`, and
reports ready only once the socket accepts. Under one nursery then run:

* the accept loop, which holds a slot of the connection cap before each `accept` (excess clients
  wait in the kernel's backlog) and checks the peer's uid before reading a byte;
* the signal watcher (SIGTERM/SIGINT stop, SIGHUP reloads);
* the socket watcher: if our socket file is removed or replaced, another daemon owns the path
  now, and we exit 0 so a service manager does not fight it (gpg-agent does the same).

Stopping: stop accepting, remove the socket (if it is still ours), give connections in flight a
short grace period, cancel the rest. Nothing is written to disk but the socket and its lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import resource
import signal
import sys
from dataclasses import dataclass, field

import trio

from aemagent import __version__
from aemagent.agent import Agent
from aemagent.api import AgentAPI
from aemagent.clocks import Clock, SystemClock
from aemagent.config import Config
from aemagent.errors import AemAgentError
from aemagent.httpserver import Limits, serve_http
from aemagent.ims import IMSClient
from aemagent.sources import ConfigProfiles
from aemagent.unixsocket import (
    AlreadyRunning,
    LifetimeLock,
    bind_socket,
    ensure_private_dir,
    identity,
    peer_uid,
)

log = logging.getLogger("aemagent.daemon")

# accept() errors that mean "out of resources for now", not "broken": wait and retry.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class DaemonSettings:
    socket_path: str
    config: Config = field(default_factory=Config)
    max_connections: int = 1024
    # Connections still busy when a stop is asked for get this long to finish.
    shutdown_grace: float = 2.0
    # How often the daemon checks that its socket file is still its own.
    watch_interval: float = 5.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        # Absolute once, here: the daemon compares and removes this path at exit.
        object.__setattr__(self, "socket_path", os.path.abspath(self.socket_path))


class _Server:
    def __init__(self, settings: DaemonSettings, agent: Agent, profiles: ConfigProfiles) -> None:
        self.settings = settings
        self.agent = agent
        self.profiles = profiles
        self.api = AgentAPI(agent, shutdown=self.request_stop, config_profiles=profiles)
        self.stop_requested = trio.Event()
        self.displaced = False
        self._slots = trio.Semaphore(settings.max_connections)
        self.accepting = trio.CancelScope()
        self._uid = os.getuid()

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        listener = trio.SocketListener(sock)
        with self.accepting:
            await self._accept_forever(listener, nursery)

    async def _accept_forever(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("accept: %s; waiting for connections to close", os.strerror(exc.errno))
                await trio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            uid = peer_uid(stream.socket)
            if uid is None or uid not in (self._uid, 0):
                # Closed without reading a byte: another user gets nothing to talk to.
                log.warning("refused a connection from uid %s", uid)
                return
            await serve_http(stream, self.api, self.settings.limits)
        finally:
            await trio.aclose_forcefully(stream)
            self._slots.release()

    async def watch_signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", self.profiles.config.path)
                    nursery.start_soon(self.profiles.reload)
                    continue
                log.info("%s: stopping", signal.Signals(signum).name)
                self.request_stop()

    async def watch_socket(self, path: str, ours: tuple[int, int]) -> None:
        while True:
            await trio.sleep(self.settings.watch_interval)
            if identity(path) != ours:
                log.warning(
                    "socket %s was removed or replaced: another agent owns it; exiting", path
                )
                self.displaced = True
                self.request_stop()
                return


async def serve_agent(
    settings: DaemonSettings,
    *,
    clock: Clock | None = None,
    ims: IMSClient | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the agent on `settings.socket_path` until stopped; reports the path when ready."""
    path = settings.socket_path
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
        sock, ours = await bind_socket(path)
        agent = Agent(
            ims, clock=clock, settings=config.policy, ims_concurrency=config.ims_concurrency
        )
        profiles = ConfigProfiles(agent, config)
        server = _Server(settings, agent, profiles)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                profiles.reserve()  # config profiles exist (as "loading") before we serve
                nursery.start_soon(profiles.load)
                closing, drained = trio.Event(), trio.Event()
                connections = await nursery.start(_serve_connections, closing, drained)
                nursery.start_soon(server.accept_loop, sock, connections)
                nursery.start_soon(server.watch_signals, nursery)
                nursery.start_soon(server.watch_socket, path, ours)
                log.info("aemagent %s serving on %s (pid %d)", __version__, path, os.getpid())
                notify_systemd("READY=1")
                task_status.started(path)
                await server.stop_requested.wait()
                notify_systemd("STOPPING=1")
                server.accepting.cancel()  # no new connections
                await trio.lowlevel.checkpoint()
                sock.close()
                if not server.displaced and identity(path) == ours:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                connections.cancel_scope.deadline = trio.current_time() + settings.shutdown_grace
                closing.set()
                await drained.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            if not server.displaced and identity(path) == ours:
                with contextlib.suppress(OSError):
                    os.unlink(path)
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


def notify_systemd(message: str) -> None:
    """Send one sd_notify datagram if systemd asked for it ($NOTIFY_SOCKET); else nothing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc.strerror)


def harden_process() -> None:
    """No core dumps, not ptrace-able by other processes of the user, enough file descriptors."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        pr_set_dumpable = 4
        if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if sys.platform == "darwin":  # pragma: no cover - macOS caps at OPEN_MAX
        target = min(target, 10240)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)


def run(settings: DaemonSettings) -> int:
    """`aemagent serve`: run in the foreground; the exit code for the process."""
    harden_process()
    try:
        trio.run(serve_agent, settings)
    except AlreadyRunning as exc:
        log.info("%s; not starting another", exc)
        return 0
    except AemAgentError as exc:
        log.error("%s", exc)
        return 1
    return 0
