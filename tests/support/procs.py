"""Real processes for integration tests: the IMS emulator and the agent, each in a context manager
that always stops what it started.

Everything runs the installed code the way a user would (`python -m aemagent …`,
`python -m aemagent.helper …`), talks over loopback HTTP and a real Unix socket, and is bounded
in time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every process gets this long for one step; CI machines are slow and shared.
STEP_TIMEOUT = 30.0

# Proxies must never see loopback traffic; tests prove the agent ignores them for loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def base_env(sock: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AEMAGENT_")}
    env["PYTHONUNBUFFERED"] = "1"
    if sock is not None:
        env["AEMAGENT_SOCK"] = sock
    env.update(extra)
    return env


def aemagent(*args: str) -> list[str]:
    return [sys.executable, "-m", "aemagent", *args]


def aem_token(*args: str) -> list[str]:
    return [sys.executable, "-m", "aemagent.helper", *args]


def run(
    argv: list[str],
    env: dict[str, str],
    *,
    stdin: bytes | None = None,
    timeout: float = STEP_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def _stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class EmulatorProcess:
    proc: subprocess.Popen[bytes]
    url: str
    credentials: dict[str, str]

    def http(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with _OPENER.open(req, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def fault(self, **fault: Any) -> None:
        self.http("POST", "/_emulator/faults", fault)

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        seen = self.http("GET", "/_emulator/requests")
        return [r for r in seen if endpoint is None or r.get("endpoint") == endpoint]

    def clear(self) -> None:
        self.http("DELETE", "/_emulator/requests")
        self.http("DELETE", "/_emulator/faults")
        self.http("POST", "/_emulator/clock", {"offset": 0})

    def aem(self, path: str, headers: dict[str, str]) -> tuple[int, str]:
        req = urllib.request.Request(self.url + path, headers=headers)
        try:
            with _OPENER.open(req, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


@contextlib.contextmanager
def emulator(directory: Path, *args: str) -> Iterator[EmulatorProcess]:
    creds = directory / "credentials"
    log = (directory / "emulator.log").open("wb")
    proc = subprocess.Popen(
        aemagent("emulator", "--port", "0", "--write-credentials", str(creds), *args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        env=base_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"emulator did not start: {(directory / 'emulator.log').read_text()}"
            )
        started = json.loads(line)
        yield EmulatorProcess(proc, started["url"], started["credentials"])
    finally:
        _stop(proc)
        if proc.stdout:
            proc.stdout.close()
        log.close()


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    sock: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        return run(aemagent(*args), self.env, stdin=stdin)

    def token(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(aem_token(*args), self.env)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        _stop(self.proc, sig)
        return self.proc.returncode


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `condition` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.02)


def wait_for_agent(
    sock: str, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0
) -> int:
    from aemagent.cli.launch import agent_pid

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = agent_pid(sock)
        if pid is not None:
            return pid
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent exited with code {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"no agent answered on {sock}")


@contextlib.contextmanager
def agent(directory: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    # A short private directory: socket paths are limited to 107 bytes, test names are long.
    sockdir = Path(tempfile.mkdtemp(prefix="aemt-"))
    sock = str(sockdir / "agent.sock")
    log_path = directory / "agent.log"
    env = base_env(sock, **(env or {}))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            aemagent("serve", "--socket", sock, "--log-level", "debug", *args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        wait_for_agent(sock, proc)
        yield AgentProcess(proc, sock, log_path, env)
    finally:
        _stop(proc)
        shutil.rmtree(sockdir, ignore_errors=True)


# ---- daemons with options, other users, leftovers (used by tests/integration/test_daemon.py)


@contextlib.contextmanager
def serving(
    sock: str,
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    user: UserPython | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[AgentProcess]:
    """`aemagent serve` on `sock` (whose directory the caller chooses), optionally as another
    user (`python_as`) or with a `preexec_fn` (umask, rlimits); waits until it answers."""
    env = base_env(sock, **(env or {}), **(user.env if user else {}))
    argv = aemagent("serve", "--socket", sock, "--log-level", "debug", *args)
    if user is not None:
        argv = user.argv(*argv[1:])
    with log_path.open("ab") as log:
        # preexec_fn is unsafe only with threads; the tests start none.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=preexec_fn,  # noqa: PLW1509
        )
    try:
        wait_for_agent(sock, proc)
        yield AgentProcess(proc, sock, log_path, env)
    finally:
        _stop(proc)


@dataclass(frozen=True)
class UserPython:
    """How to run this package's Python code as another user: `setpriv … python` and env."""

    drop: tuple[str, ...]  # setpriv --reuid=… --regid=… --clear-groups
    python: str
    env: dict[str, str]

    def argv(self, *args: str) -> list[str]:
        """`python *args` as the user (with `self.env` added to the environment)."""
        return [*self.drop, self.python, *args]

    def command(self, *argv: str) -> list[str]:
        """Any other command as the user."""
        return [*self.drop, *argv]


@functools.cache
def python_as(uid: int, gid: int) -> UserPython | None:
    """A Python that `uid` can run with this package importable, or None (not root, no
    setpriv, or the interpreter lives where `uid` cannot read, e.g. under a 0700 /root).

    Tries this interpreter first, then the system's python of the same version with this
    package's and its dependencies' directories on PYTHONPATH."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.getuid() != 0:
        return None
    import trio

    import aemagent as package

    drop = (setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups")
    roots = [str(Path(m.__file__ or "").resolve().parent.parent) for m in (package, trio)]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, {})]
    for directory in ("/usr/bin", "/usr/local/bin"):
        system = f"{directory}/python{version}"
        candidates.append((system, {"PYTHONPATH": os.pathsep.join(dict.fromkeys(roots))}))
    for python, extra in candidates:
        if not os.path.exists(python):
            continue
        probe = subprocess.run(
            [*drop, python, "-c", "import aemagent.daemon.server"],
            env=base_env(**extra),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        if probe.returncode == 0:
            return UserPython(drop, python, extra)
    return None


def agent_pids(path: str) -> list[int]:
    """Live (not zombie) `aemagent serve` processes whose --socket is `path` or lies under it."""
    prefix = os.fsencode(path.rstrip("/") + "/")
    wanted = os.fsencode(path)
    found = []
    for entry, state, argv in _processes():
        if state == b"Z" or b"serve" not in argv or b"--socket" not in argv:
            continue
        i = argv.index(b"--socket")
        sock = argv[i + 1] if i + 1 < len(argv) else b""
        if sock == wanted or sock.startswith(prefix):
            found.append(int(entry))
    return sorted(found)


def _processes() -> Iterator[tuple[str, bytes, list[bytes]]]:
    """(pid, state letter, argv) of every process: from /proc, or from ps(1) where there is
    no /proc (macOS; its argv is split at spaces, which the tests' paths do not contain)."""
    if not os.path.isdir("/proc"):
        listed = subprocess.run(
            ["ps", "-axww", "-o", "pid=,stat=,command="],
            capture_output=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        for line in listed.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 3:
                yield fields[0].decode(), fields[1][:1], fields[2:]
        return
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        yield entry, state, argv


def kill_agents(path: str) -> list[int]:
    """SIGKILL every daemon `agent_pids(path)` finds (leftovers of `aemagent start`)."""
    pids = agent_pids(path)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


# ---- raw HTTP on the agent's socket (for hostile-input tests)


def raw_exchange(sock: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; everything received until the daemon closes."""
    import socket

    received = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                received += chunk
    return bytes(received)


def raw_answer(raw: bytes) -> tuple[int, dict[str, object]]:
    """Status and JSON body of one raw HTTP/1.1 answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    assert status_line[0] == b"HTTP/1.1", raw[:200]
    return int(status_line[1]), json.loads(body)
