"""Many `aemagent start`s at once on one fresh socket: one daemon, and nothing left starting.

Each `start` that finds no agent spawns a daemon child; the children race for the lifetime lock
and one wins. Broken: a `start` whose child lost returned as soon as the winner answered, while
its child could still be importing. If the winner then died (`kill -9 $AEMAGENT_PID`), a late
child took the lock and served as a new agent nobody had been told about, with no profiles:
`aem-token` exited 3 instead of 2 and `AEMAGENT_PID` named a dead process. Seen with 16 starts on
a loaded machine: three daemons for one socket 6 s after every `start` had returned.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import procs
from procs import wait_for

RACERS = 16


def _env(base: Path) -> dict[str, str]:
    home = base / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    return procs.base_env(None, HOME=str(home), XDG_STATE_HOME=str(home / "state"))


def _pid(stdout: str) -> int:
    found = re.findall(r"^AEMAGENT_PID=(\d+); export AEMAGENT_PID;$", stdout, re.MULTILINE)
    assert len(found) == 1, stdout
    return int(found[0])


def _race(sock: str, env: dict[str, str]) -> list[tuple[int, str, str]]:
    racers = [
        subprocess.Popen(
            procs.aemagent("start", "--socket", sock),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(RACERS)
    ]
    try:
        outputs = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()
    return [(r.returncode, out, err) for r, (out, err) in zip(racers, outputs, strict=True)]


def test_sixteen_starts_leave_exactly_one_daemon_when_the_last_returns(base: Path) -> None:
    sock = str(base / "s" / "agent.sock")
    env = _env(base)
    try:
        results = _race(sock, env)
        # Counted at once, with no grace period: every child a losing `start` spawned is gone.
        daemons = procs.agent_pids(sock)
        assert [code for code, _, _ in results] == [0] * RACERS, results
        pids = {_pid(out) for _, out, _ in results}
        assert len(pids) == 1, results
        (pid,) = pids
        assert daemons == [pid], f"{len(daemons)} daemons for one socket: {daemons}"

        # The announced agent dies: nobody takes its place unannounced.
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: procs.agent_pids(sock) == [], 10, "the killed agent to be gone")
        time.sleep(1.0)  # a late child would have taken the lock and bound by now
        assert procs.agent_pids(sock) == []
        token = procs.run(procs.aem_token("--socket", sock), env)
        assert token.returncode == 2, token.stderr  # no agent, not "no such profile" (3)
    finally:
        procs.kill_agents(sock)
