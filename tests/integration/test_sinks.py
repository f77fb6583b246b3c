"""Token files (`[[sink]]`): the real daemon, the emulator, a config file, files on /dev/shm."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import procs
import pytest


@pytest.fixture
def shm() -> Iterator[Path]:
    """A private directory on a tmpfs (/dev/shm itself is 1777: other users can write to it)."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    directory = Path(tempfile.mkdtemp(prefix="aemsink-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def sink(profile: str, path: Path, fmt: str = "token", extra: str = "") -> str:
    return f'[[sink]]\nprofile = "{profile}"\npath = "{path}"\nformat = "{fmt}"\n{extra}'


def wait_for_content(path: Path, what: str, differs_from: str | None = None) -> str:
    def ready() -> bool:
        return path.exists() and path.read_text() not in ("", differs_from)

    procs.wait_for(ready, 20, what)
    return path.read_text()


def test_a_sink_holds_the_token_in_each_format_is_rewritten_and_removed(tmp_path, ims, shm):
    config = tmp_path / "config.toml"
    service = ims.credentials["service"]
    files = {fmt: shm / f"token.{fmt}" for fmt in ("token", "header", "json")}
    config.write_text(
        f'[profiles.one]\nfile = "{service}"\n'
        + "".join(sink("one", path, fmt) for fmt, path in files.items())
    )
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        for fmt, path in files.items():
            content = wait_for_content(path, f"the {fmt} sink")
            assert os.stat(path).st_mode & 0o777 == 0o600
            printed = agent.token("--profile", "one", "--format", fmt)
            assert printed.returncode == 0, printed.stderr
            if fmt == "json":  # expires_in is as of the write
                assert {**json.loads(content), "expires_in": 0} == {
                    **json.loads(printed.stdout),
                    "expires_in": 0,
                }
                assert content.endswith("}\n")
            else:
                assert content == printed.stdout
        before = files["token"].read_text()
        inode = os.stat(files["token"]).st_ino
        assert agent.cli("refresh", "one").returncode == 0
        after = wait_for_content(files["token"], "the new token", differs_from=before)
        assert after == agent.token("--profile", "one").stdout
        assert os.stat(files["token"]).st_ino != inode  # a new file renamed into place
        assert sorted(p.name for p in shm.iterdir()) == sorted(p.name for p in files.values())

        assert agent.cli("forget", "one").returncode == 0
        procs.wait_for(lambda: not any(p.exists() for p in files.values()), 20, "removal")
        assert list(shm.iterdir()) == []


def test_a_sink_waits_for_its_profile_and_goes_on_sigterm(tmp_path, ims, shm):
    path = shm / "token"
    config = tmp_path / "config.toml"
    config.write_text(sink("later", path))
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        assert not path.exists()
        added = agent.cli("add", ims.credentials["service"], "--name", "later")
        assert added.returncode == 0, added.stderr
        assert wait_for_content(path, "the sink") == agent.token("--profile", "later").stdout
        assert agent.stop(signal.SIGTERM) == 0
    assert not path.exists()


def test_a_sink_on_disk_is_refused_unless_allowed(tmp_path, ims):
    disk = tmp_path / "out"  # under /tmp here: ext4
    disk.mkdir(mode=0o700)
    path = disk / "token"
    config = tmp_path / "config.toml"
    service = ims.credentials["service"]
    config.write_text(f'[profiles.one]\nfile = "{service}"\n' + sink("one", path))
    started = procs.run(
        procs.aemagent("serve", "--socket", str(tmp_path / "s"), "--config", str(config)),
        procs.base_env(str(tmp_path / "s")),
    )
    assert started.returncode != 0
    message = started.stderr.strip()
    assert f"sink {path}: {disk} is on " in message
    assert "not a memory file system (tmpfs/ramfs); set allow_disk = true" in message
    assert "\n" not in message
    assert not path.exists()

    config.write_text(f'[profiles.one]\nfile = "{service}"\n')
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        config.write_text(f'[profiles.one]\nfile = "{service}"\n' + sink("one", path))
        reloaded = agent.cli("reload")
        assert reloaded.returncode != 0
        assert "not a memory file system" in reloaded.stderr
        assert not path.exists()

        config.write_text(
            f'[profiles.one]\nfile = "{service}"\n' + sink("one", path, extra="allow_disk = true\n")
        )
        assert agent.cli("reload").returncode == 0
        assert wait_for_content(path, "the allowed sink") == agent.token("--profile", "one").stdout

        config.write_text(f'[profiles.one]\nfile = "{service}"\n')  # the sink leaves the config
        assert agent.cli("reload").returncode == 0
        procs.wait_for(lambda: not path.exists(), 20, "removal on reload")
