"""What a service manager (systemd) passes the daemon, and what the daemon tells it back.

* Socket activation (sd_listen_fds(3)): systemd binds the socket; `inherited_socket` takes it
  from fd 3 and names its path, so that the lifetime lock and the displacement check still apply.
* The notify socket (sd_notify(3), `$NOTIFY_SOCKET`): `Notifier` sends READY=1, STATUS= and
  STOPPING=1 as datagrams, without libsystemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from aemagent.errors import SocketDirError

log = logging.getLogger("aemagent.daemon")

# sd_listen_fds(3): inherited sockets start at this descriptor.
SD_LISTEN_FDS_START = 3


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


class Notifier:
    """sd_notify(3) without libsystemd: one datagram per message; nothing without an address."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    def __bool__(self) -> bool:
        return self.address is not None

    def send(self, message: str) -> None:
        if self.address is None:
            return
        address = self.address
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                # A manager that does not read its queue must not stall the daemon.
                s.setblocking(False)
                s.connect(address)
                s.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify the service manager: %s", exc.strerror or exc)
