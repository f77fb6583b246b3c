"""Socket activation and sd_notify with the real systemd tools.

`systemd-socket-activate -l PATH -- aemagent serve` binds PATH, waits for the first connection,
then execs the daemon in place (same PID) with LISTEN_FDS/LISTEN_PID set and the socket on fd 3,
exactly as a systemd socket unit does. A datagram socket the test binds stands in for systemd's
$NOTIFY_SOCKET and receives READY=1, STATUS= and STOPPING=1.

Skipped, saying so, where systemd-socket-activate is not installed (`.ci/run` installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import procs
import pytest
from procs import wait_for

from aemagent.cli.launch import agent_pid
from aemagent.daemon.unixsocket import lock_is_held

ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="systemd is Linux only"),
    pytest.mark.skipif(
        ACTIVATE is None, reason="systemd-socket-activate (Debian package systemd) is not installed"
    ),
]

# A daemon whose socket file is removed or replaced notices at once (inotify on its directory)
# and exits; this is the bound for that, with room for a loaded machine.
DISPLACED_WITHIN = 3.0


class Notifications:
    """A stand-in for systemd's notify socket: collects what the daemon sends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def wait_for(self, wanted: str | Callable[[str], bool], timeout: float = 20.0) -> str:
        match = wanted if callable(wanted) else (lambda m: m == wanted)
        for message in self.received:
            if match(message):
                return message
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.received.append(message)
            if match(message):
                return message
        raise AssertionError(f"no notification {wanted!r} within {timeout:g} s: {self.received}")


@contextlib.contextmanager
def activated(
    listen: str, log: Path, *serve_args: str, options: tuple[str, ...] = (), **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`systemd-socket-activate -l LISTEN -- python -m aemagent serve …`, killed afterwards.

    The activator passes on only TERM, PATH and HOME, plus the -E variables."""
    assert ACTIVATE is not None
    setenv = [f"-E{name}={value}" for name, value in {"PYTHONUNBUFFERED": "1", **env}.items()]
    argv = [ACTIVATE, *options, "-l", listen, *setenv, "--", *procs.aemagent("serve", *serve_args)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        if not listen.startswith("@"):
            wait_for(lambda: os.path.exists(listen), 10, f"the activator to bind {listen}")
        yield proc
    finally:
        procs._stop(proc, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _profiles(agent_env: dict[str, str]) -> dict[str, dict[str, object]]:
    done = procs.run(procs.aemagent("status", "--json"), agent_env)
    assert done.returncode == 0, done.stderr
    return {p["name"]: p for p in json.loads(done.stdout)["profiles"]}


def _token(agent_env: dict[str, str], profile: str) -> str:
    done = procs.run(procs.aem_token("--profile", profile), agent_env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_activated_daemon_serves_tokens_reloads_and_reports_to_systemd(
    base: Path, ims: procs.EmulatorProcess
) -> None:
    """The whole activated life: racing `start`s activate one daemon and all print its PID; it
    serves a real token through systemd's socket; STATUS= follows the profiles through an add
    and a SIGHUP reload (a profile added, one changed, an unchanged one keeping its token); it
    outlives its own socket watcher; SIGTERM sends STOPPING=1, exits 0 and leaves the socket
    file to systemd. Children never see LISTEN_FDS, LISTEN_PID or NOTIFY_SOCKET.

    Broken (each seen): unlinking an activated socket at stop fails the last check; leaving
    LISTEN_FDS or NOTIFY_SOCKET in the environment shows them to the profile command; without
    the profiles' `changed` events in `report_status`, STATUS= stays at "1 refreshing"; without
    `inherited_socket` the racers end up with a daemon of their own, not the activated one."""
    sockdir = base / "run"
    sockdir.mkdir(mode=0o700)
    sock = str(sockdir / "agent.sock")
    seen_env = base / "command.env"
    creds = ims.credentials
    config = base / "config.toml"
    one = f"[profiles.one]\ncommand = \"env > '{seen_env}'; cat '{creds['service']}'\"\n"
    config.write_text(one + f'[profiles.two]\nfile = "{creds["devtoken"]}"\n')
    env = procs.base_env(sock)
    notes = Notifications(str(base / "notify"))
    log = base / "agent.log"
    try:
        with activated(
            sock, log, "--config", str(config), "--log-level", "debug", NOTIFY_SOCKET=notes.path
        ) as proc:
            assert _still_the_activator(proc.pid)  # nothing runs until someone connects
            racers = [
                subprocess.Popen(
                    procs.aemagent("start", "--socket", sock),
                    env=procs.base_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(3)
            ]
            outputs = [racer.communicate(timeout=30) for racer in racers]
            assert [r.returncode for r in racers] == [0, 0, 0], outputs
            pids = {int(re.findall(r"AEMAGENT_PID=(\d+);", out)[0]) for out, _ in outputs}
            assert pids == {proc.pid}, outputs  # exec'd in place: the activator's PID
            assert not any(err for _, err in outputs), outputs  # nobody claims to have started it
            notes.wait_for("READY=1")
            assert f"serving on {sock} (socket activation) (pid {proc.pid})" in log.read_text()

            notes.wait_for("STATUS=2 profiles: 2 valid")
            children_saw = seen_env.read_text()
            for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
                assert f"{name}=" not in children_saw, name

            added = procs.run(
                procs.aemagent("add", creds["oauth"], "--name", "byhand"), env, timeout=30
            )
            assert added.returncode == 0, added.stderr
            notes.wait_for("STATUS=3 profiles: 3 valid")
            header = procs.run(procs.aem_token("--profile", "one", "--format", "header"), env)
            assert header.returncode == 0, header.stderr
            name, _, value = header.stdout.strip().partition(": ")
            assert ims.aem("/aem/content.json", {name: value})[0] == 200
            kept = _token(env, "one")

            # SIGHUP: `one` unchanged, `two` now another kind of credential, `three` new.
            config.write_text(
                one
                + f'[profiles.two]\nfile = "{creds["oauth"]}"\n'
                + f'[profiles.three]\nfile = "{creds["devtoken"]}"\n'
            )
            reloaded = procs.run(procs.aemagent("reload"), env)
            assert reloaded.returncode == 0, reloaded.stderr
            assert f"pid {proc.pid}" in reloaded.stdout
            notes.wait_for("STATUS=4 profiles: 4 valid")
            profiles = _profiles(env)
            assert sorted(profiles) == ["byhand", "one", "three", "two"]
            assert (profiles["two"]["kind"], profiles["three"]["kind"]) == ("oauth", "devtoken")
            assert _token(env, "one") == kept

            # A change in its directory wakes the socket watcher: it finds systemd's file
            # unchanged (its identity taken from the inherited socket) and serves on.
            assert f"watching {sock}: inotify" in log.read_text()
            (sockdir / "unrelated").touch()
            (sockdir / "unrelated").unlink()
            time.sleep(0.5)
            assert agent_pid(sock) == proc.pid

            ours = os.lstat(sock)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, log.read_text()
            notes.wait_for("STOPPING=1")
        after = os.lstat(sock)  # left to systemd, untouched
        assert stat.S_ISSOCK(after.st_mode)
        assert (after.st_dev, after.st_ino) == (ours.st_dev, ours.st_ino)
        assert not lock_is_held(sock)
        assert "Traceback" not in log.read_text()
    finally:
        notes.close()


def _still_the_activator(pid: int) -> bool:
    """Whether `pid` is still systemd-socket-activate (it execs the daemon on first contact)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].endswith(b"systemd-socket-activate")


@pytest.mark.parametrize("case", ["datagram", "accepted-connection", "abstract"])
def test_an_unusable_inherited_socket_is_refused_in_one_line(base: Path, case: str) -> None:
    """A socket unit written wrong (ListenDatagram=, Accept=yes, an abstract address) gets one
    clear line in the log and in STATUS=, and exit 1, not a traceback or a daemon that serves
    nothing.

    Broken: without `_unusable`'s checks the daemon tries to accept on a datagram or connected
    socket (a traceback), or takes an abstract name for a path."""
    sockdir = base / "run"
    sockdir.mkdir(mode=0o700)
    notes = Notifications(str(base / "notify"))
    log = base / "agent.log"
    listen = str(sockdir / "agent.sock")
    options: tuple[str, ...] = ()
    if case == "datagram":
        options, wanted = ("--datagram",), "a SOCK_DGRAM socket, not SOCK_STREAM"
    elif case == "accepted-connection":
        options, wanted = ("--accept",), "a socket that does not listen"
    else:
        listen, wanted = f"@aemagent-test-{os.getpid()}-{time.monotonic_ns()}", "not to an absolute"
    try:
        with activated(listen, log, NOTIFY_SOCKET=notes.path, options=options) as proc:
            address = "\0" + listen[1:] if listen.startswith("@") else listen
            kind = socket.SOCK_DGRAM if case == "datagram" else socket.SOCK_STREAM
            with socket.socket(socket.AF_UNIX, kind) as client:
                # An abstract address has no file to wait for: retry until it is bound.
                wait_for(lambda: client.connect_ex(address) == 0, 10, f"the activator on {listen}")
                if case == "datagram":
                    client.send(b"wake up")
                status = notes.wait_for(lambda m: m.startswith("STATUS="))
                assert wanted in status, status
                if case != "accepted-connection":  # --accept forks; the activator stays
                    assert proc.wait(timeout=15) == 1
        text = log.read_text()
        assert wanted in text
        assert "Traceback" not in text
        assert "READY=1" not in notes.received
    finally:
        notes.close()


def test_systemd_taking_the_path_displaces_a_started_agent_and_serve_yields(base: Path) -> None:
    """Enabling the socket unit while an `aemagent start` agent runs: systemd unlinks and
    rebinds the path, the old agent notices at once (inotify) and exits 0 (it never touches
    systemd's socket). A plain `serve` then finds systemd's socket listening without a
    lock: it exits 0 and leaves it alone, and its probe has activated the real one.

    Broken: without the watcher the old agent serves on forever (orphaned); without the
    connect probe in bind_socket, `serve` renames its own socket over systemd's."""
    sockdir = base / "run"
    sockdir.mkdir(mode=0o700)
    sock = str(sockdir / "agent.sock")
    home = base / "home"
    home.mkdir(mode=0o700)
    env = procs.base_env(HOME=str(home), XDG_STATE_HOME=str(home / "state"))
    started = procs.run(procs.aemagent("start", "--socket", sock), env)
    assert started.returncode == 0, started.stderr
    old = int(re.findall(r"AEMAGENT_PID=(\d+);", started.stdout)[0])
    log = base / "activated.log"
    with activated(sock, log) as proc:
        wait_for(lambda: not _alive(old), DISPLACED_WITHIN, "the displaced agent to exit")
        old_log = (home / "state" / "aemagent" / "agent.log").read_text()
        assert "removed or replaced" in old_log
        assert os.path.exists(sock)  # systemd's file: the displaced agent left it alone

        served = procs.run(procs.aemagent("serve", "--socket", sock), env, timeout=20)
        assert served.returncode == 0, served.stderr
        assert "a listener that holds no lock (systemd's socket?) already serves" in served.stderr
        assert agent_pid(sock) == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    assert os.path.exists(sock)
