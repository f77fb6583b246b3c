"""Files aemagent writes: the config file (`add --save`) and the log of `aemagent start`.

A symbolic link or a file planted where we write must never make us write somewhere else, and a
refusal is one line, not a traceback.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import procs
import pytest

from aemagent.daemon import config as config_mod
from aemagent.daemon.config import ProfileSource, save_profile
from aemagent.errors import ConfigError


def _env(base: Path) -> dict[str, str]:
    home = base / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    return procs.base_env(
        HOME=str(home), XDG_STATE_HOME=str(home / "state"), XDG_CONFIG_HOME=str(home / "config")
    )


# ---- the agent's log


@pytest.mark.parametrize("planted", ["symlink", "dangling symlink", "fifo"])
def test_start_refuses_a_planted_log_in_one_line(base, planted):
    sock = str(base / "s" / "agent.sock")
    env = _env(base)
    logdir = base / "home" / "state" / "aemagent"
    logdir.mkdir(parents=True, mode=0o700)
    log = logdir / "agent.log"
    victim = base / "victim"
    if planted == "symlink":
        victim.write_text("precious\n")
        log.symlink_to(victim)
    elif planted == "dangling symlink":
        log.symlink_to(victim)
    else:
        os.mkfifo(log, 0o600)
    done = procs.run(procs.aemagent("start", "--socket", sock), env, timeout=20)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"aemagent: cannot open the agent's log file {log}: ") or (
        done.stderr == f"aemagent: the agent's log file {log} is not a regular file; remove it\n"
    ), done.stderr
    if planted == "symlink":
        assert victim.read_text() == "precious\n"
    else:
        assert not victim.exists()
    assert procs.agent_pids(str(base)) == []


# ---- the config file


def _source(name: str = "p1-e2") -> ProfileSource:
    return ProfileSource(name=name, file="/secrets/p1-e2.json", hosts=("author-p1-e2.x",))


def test_save_does_not_write_through_a_planted_temporary_file(tmp_path, monkeypatch):
    """The temporary file is created, never opened: a symlink at any name it could take, pointing
    at a file of ours, leaves that file as it was."""
    path = tmp_path / "config.toml"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    # Were the name predictable, a planted link would be written through: the old name was
    # `.config.toml.<pid>.tmp`. Plant that one and pin the random part too.
    (tmp_path / f".config.toml.{os.getpid()}.tmp").symlink_to(victim)
    monkeypatch.setattr(config_mod, "_temporary_suffix", lambda: "fixed")
    (tmp_path / f".config.toml.{os.getpid()}.fixed.tmp").symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot write"):
        save_profile(str(path), _source())
    assert victim.read_text() == "precious\n"
    assert not path.exists()
    monkeypatch.undo()
    save_profile(str(path), _source())  # another random name: fine
    assert victim.read_text() == "precious\n"
    assert tomllib.loads(path.read_text())["profiles"]["p1-e2"]["file"] == "/secrets/p1-e2.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_through_a_symlinked_config_replaces_its_target(tmp_path):
    """Dotfile managers link config.toml into a repository: the link stays a link, the file it
    points to is the one rewritten (atomically, in its own directory)."""
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    target = dotfiles / "aemagent.toml"
    target.write_text('[profiles.other]\ncommand = "pass show aem"\n')
    target.chmod(0o600)
    confdir = tmp_path / "config"
    confdir.mkdir()
    link = confdir / "config.toml"
    link.symlink_to(os.path.relpath(target, confdir))
    save_profile(str(link), _source())
    assert link.is_symlink()
    assert link.resolve() == target.resolve()
    profiles = tomllib.loads(target.read_text())["profiles"]
    assert sorted(profiles) == ["other", "p1-e2"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in confdir.iterdir()) == ["config.toml"]
    assert sorted(p.name for p in dotfiles.iterdir()) == ["aemagent.toml"]  # no temporary left


def test_save_through_a_dangling_symlink_is_refused_in_one_line(tmp_path):
    link = tmp_path / "config.toml"
    link.symlink_to(tmp_path / "nowhere" / "config.toml")
    with pytest.raises(ConfigError) as caught:
        save_profile(str(link), _source())
    assert "\n" not in str(caught.value)
    assert str(link) in str(caught.value)
    assert link.is_symlink()
    assert not (tmp_path / "nowhere").exists()


def test_stale_temporaries_of_killed_saves_are_still_removed(tmp_path):
    path = tmp_path / "config.toml"
    dead = _dead_pid()
    stale = tmp_path / f".config.toml.{dead}.abcdef12.tmp"
    stale.write_text("half")
    older = tmp_path / f".config.toml.{dead}.tmp"  # the name before random suffixes
    older.write_text("half")
    mine = tmp_path / f".config.toml.{os.getpid()}.abcdef12.tmp"  # alive: kept
    mine.write_text("half")
    save_profile(str(path), _source())
    assert not stale.exists()
    assert not older.exists()
    assert mine.exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
