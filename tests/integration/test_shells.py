"""`aemagent start --sh|--csh|--fish` evaluated by the real shells, and the README's login
snippets: the agent starts once per login, not once per shell.

sh (dash on Debian), bash, zsh, tcsh and fish each run where installed and are skipped, saying
so, where not (`.ci/run` installs them). `aemagent` on the shells' PATH is a small wrapper that
counts its calls, then runs this package.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import procs
import pytest

from aemagent.cli.launch import agent_pid

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

README = Path(__file__).resolve().parents[2] / "README.md"


@dataclass(frozen=True)
class Shell:
    name: str
    argv: tuple[str, ...]  # runs a script given as the next argument, reading no rc files
    syntax: str  # aemagent start --sh / --csh / --fish
    evaluate: str  # `aemagent start` evaluated the way the README says
    source: str  # source a file: {path}
    snippet: str  # the README's once-per-login lines for this shell

    def run(self, script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.argv, script],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


SH_SNIPPET = 'kill -0 "${AEMAGENT_PID:-x}" 2>/dev/null || eval "$(aemagent start)"\n'
CSH_SNIPPET = """\
if ( $?AEMAGENT_PID ) then
    ( kill -0 $AEMAGENT_PID ) >& /dev/null || unsetenv AEMAGENT_PID
endif
if ( ! $?AEMAGENT_PID ) eval "`aemagent start --csh`"
"""
FISH_SNIPPET = 'kill -0 "$AEMAGENT_PID" 2>/dev/null; or aemagent start --fish | source\n'

_SH_EVAL = 'eval "$(aemagent start)"'
SHELLS = {
    "sh": Shell("sh", ("sh", "-c"), "sh", _SH_EVAL, ". {path}", SH_SNIPPET),
    "bash": Shell("bash", ("bash", "--norc", "-c"), "sh", _SH_EVAL, ". {path}", SH_SNIPPET),
    "zsh": Shell("zsh", ("zsh", "-f", "-c"), "sh", _SH_EVAL, ". {path}", SH_SNIPPET),
    "tcsh": Shell(
        "tcsh",
        ("tcsh", "-f", "-c"),
        "csh",
        'eval "`aemagent start --csh`"',
        "source {path}",
        CSH_SNIPPET,
    ),
    "fish": Shell(
        "fish",
        ("fish", "--no-config", "-c"),
        "fish",
        "aemagent start --fish | source",
        "source {path}",
        FISH_SNIPPET,
    ),
}


def _shell(name: str) -> Shell:
    shell = SHELLS[name]
    if shutil.which(shell.argv[0]) is None:
        pytest.skip(f"{shell.argv[0]} is not installed")
    return shell


@pytest.fixture
def base() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="aems-"))
    try:
        yield directory
    finally:
        procs.kill_agents(str(directory))
        shutil.rmtree(directory, ignore_errors=True)


def _path_with_wrapper(base: Path) -> tuple[str, Path]:
    """A PATH whose `aemagent` counts its calls (one line each in the returned file) and adds
    `--socket "$TEST_SOCKET"` when that is set (no shell quoting of its own in the test)."""
    bin_dir = base / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = base / "calls"
    calls.touch()
    wrapper = bin_dir / "aemagent"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"echo called >> {shlex.quote(str(calls))}\n"
        'if [ -n "$TEST_SOCKET" ]; then set -- "$@" --socket "$TEST_SOCKET"; fi\n'
        f'exec {shlex.join(procs.aemagent())} "$@"\n'
    )
    wrapper.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", calls


def _clean_env(base: Path, **extra: str) -> dict[str, str]:
    """A login's environment: no AEMAGENT_*, no shell startup files, home and state in base."""
    env = procs.base_env(HOME=str(base / "home"), XDG_STATE_HOME=str(base / "home" / "state"))
    for name in ("ENV", "BASH_ENV", "ZDOTDIR", "XDG_CONFIG_HOME"):
        env.pop(name, None)
    env.update(extra)
    return env


def _printed(stdout: str) -> dict[str, str]:
    """`printenv` output of the two variables, as the script prints them."""
    lines = stdout.splitlines()
    assert len(lines) == 2, stdout
    return {"AEMAGENT_PID": lines[0], "AEMAGENT_SOCK": lines[1]}


_SHOW = "; printenv AEMAGENT_PID; printenv AEMAGENT_SOCK"


def _wait_until_reaped(pid: int, timeout: float = 10.0) -> None:
    """Until `kill -0 pid` fails: the process has exited and been reaped (a zombie answers)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"pid {pid} still exists after {timeout:g} s"
        time.sleep(0.02)


@pytest.mark.parametrize("name", list(SHELLS))
def test_start_output_is_evaluated_by_each_shell(base: Path, name: str) -> None:
    """The exported variables reach child processes (`printenv`), with a socket path holding a
    space, `$`, `*` and `&` intact, the same for every syntax.

    Broken: dropping the quoting in `shell_lines` splits or expands the path; csh lines
    without `;` break when backquotes join them onto one line."""
    shell = _shell(name)
    odd = base / "a b$c*&d"
    sock = str(odd / "agent.sock")
    path, calls = _path_with_wrapper(base)
    with procs.serving(sock, base / "agent.log") as agent:
        env = _clean_env(base, PATH=path, TEST_SOCKET=sock)
        done = shell.run(shell.evaluate + _SHOW, env)
        assert done.returncode == 0, done.stderr
        assert _printed(done.stdout) == {"AEMAGENT_PID": str(agent.pid), "AEMAGENT_SOCK": sock}
    assert calls.read_text().count("called") == 1


@pytest.mark.parametrize("name", list(SHELLS))
def test_the_readme_snippet_starts_the_agent_once_per_login(base: Path, name: str) -> None:
    """The README's lines, as a login shell and then as every shell started under it (which
    inherits AEMAGENT_PID): the first starts the agent at the default path, the others cost a
    `kill -0` and run no Python; once the agent is gone, the next shell starts a new one.

    Broken: testing only that the socket file exists misses an agent killed with -9 (a stale
    socket); running `aemagent start` unconditionally starts Python in every shell (the
    wrapper counts every call)."""
    shell = _shell(name)
    assert shell.snippet in README.read_text(), "the README must show exactly these lines"
    rc = base / "rc"
    rc.write_text(shell.snippet)
    runtime = base / "run"
    runtime.mkdir(mode=0o700)
    sock = str(runtime / "aemagent" / "agent.sock")  # the default path, from XDG_RUNTIME_DIR
    path, calls = _path_with_wrapper(base)
    login = _clean_env(base, PATH=path, XDG_RUNTIME_DIR=str(runtime))
    script = shell.source.format(path=shlex.quote(str(rc))) + _SHOW

    first = shell.run(script, login)
    assert first.returncode == 0, first.stderr
    exported = _printed(first.stdout)
    assert exported["AEMAGENT_SOCK"] == sock
    pid = int(exported["AEMAGENT_PID"])
    assert agent_pid(sock) == pid
    assert calls.read_text().count("called") == 1

    inherited = login | exported
    for _ in range(3):  # new terminals, tmux panes, subshells
        later = shell.run(script, inherited)
        assert later.returncode == 0, later.stderr
        assert _printed(later.stdout) == exported
    assert calls.read_text().count("called") == 1

    stopped = procs.run(procs.aemagent("stop", "--socket", sock), login)
    assert stopped.returncode == 0, stopped.stderr
    _wait_until_reaped(pid)  # `stop` returns once the lock is free, a moment before the exit
    again = shell.run(script, inherited)
    assert again.returncode == 0, again.stderr
    restarted = _printed(again.stdout)
    assert restarted["AEMAGENT_PID"] != exported["AEMAGENT_PID"]
    assert agent_pid(sock) == int(restarted["AEMAGENT_PID"])
    assert calls.read_text().count("called") == 2
    assert procs.run(procs.aemagent("stop", "--socket", sock), login).returncode == 0
