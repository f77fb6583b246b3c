"""Reloads of the config file: one at a time, coalesced, and their outcome over the socket.

In-process tests run the real `ConfigProfiles` and `Agent` (fake IMS, real commands); the
integration tests run the real daemon, SIGHUP and `POST /v1/reload`, against the emulator.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path

import procs
import pytest
import trio
from fakes import FakeIMS, FixedRandom, LinkedClock
from keys import dev_token, devtoken_json, key_pair, service_json

from aemagent.core.agent import Agent
from aemagent.daemon.config import load_config
from aemagent.daemon.sources import ConfigProfiles, ReloadOutcome
from aemagent.errors import ConfigError


def write_json(path: Path, obj: object) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def slow_profile(name: str, credential: str, starts: Path) -> str:
    """A config profile whose command notes each start in `starts`, then takes a second."""
    return f"[profiles.{name}]\ncommand = '''echo x >> {starts}; sleep 1; cat {credential}'''\n"


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@asynccontextmanager
async def config_profiles(path: Path):
    clock = LinkedClock()
    ims = FakeIMS(clock)
    async with trio.open_nursery() as nursery:
        agent = Agent(ims, clock=clock, rng=FixedRandom(0.0))
        await nursery.start(agent.run)
        profiles = ConfigProfiles(agent, load_config(str(path)))
        profiles.reserve()
        await profiles.load()
        yield agent, profiles
        nursery.cancel_scope.cancel()


async def wait_until(condition, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def test_an_older_reload_never_re_adds_what_a_newer_config_removed(tmp_path):
    """Reload A reads a config with `slow` and waits for its command; the config loses `slow`;
    reloads B and C are asked for. Broken: B ran at once and removed `slow`, then A finished and
    added it back. Now B and C wait for A, run once, and share that outcome."""
    starts = tmp_path / "starts"
    credential = write_json(tmp_path / "c.json", service_json(key_pair(0)))
    fast = write_json(tmp_path / "f.json", service_json(key_pair(1)))
    config = tmp_path / "config.toml"
    config.write_text(
        slow_profile("slow", credential, starts) + f'[profiles.fast]\nfile = "{fast}"\n'
    )
    async with config_profiles(config) as (agent, profiles):
        assert [p.name for p in agent.profiles()] == ["fast", "slow"]
        outcomes: dict[str, ReloadOutcome] = {}

        async def reload(key: str) -> None:
            outcomes[key] = await profiles.reload()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload, "a")
            await wait_until(lambda: lines(starts) == 2)  # A has read the config: runs `slow`
            config.write_text(f'[profiles.fast]\nfile = "{fast}"\n')
            nursery.start_soon(reload, "b")
            nursery.start_soon(reload, "c")
        assert [p.name for p in agent.profiles()] == ["fast"]
        assert lines(starts) == 2  # B and C were one reload, of the newest config
        assert outcomes["a"].profiles == ("fast", "slow")
        assert outcomes["b"] is outcomes["c"]
        assert outcomes["b"].profiles == ("fast",)


async def test_a_manual_refresh_reading_a_source_waits_for_a_running_reload(tmp_path):
    """`aemagent refresh slow` reads the source of `slow` again; a reload removing `slow` is
    under way. Broken: the refresh's read finished last and re-added the removed profile."""
    starts = tmp_path / "starts"
    credential = write_json(tmp_path / "c.json", service_json(key_pair(0)))
    config = tmp_path / "config.toml"
    config.write_text(slow_profile("slow", credential, starts))
    async with config_profiles(config) as (agent, profiles):
        config.write_text("")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(profiles.reread, "slow")
            await wait_until(lambda: lines(starts) == 2)
            nursery.start_soon(profiles.reload)
        assert agent.profiles() == []
        await profiles.reread("slow")  # no longer in the config: nothing read, nothing added
        assert agent.profiles() == []
        assert lines(starts) == 2


async def test_two_quick_reloads_after_a_credential_changed_leave_one_live_profile(tmp_path):
    """The file of a config profile holds a new credential; two reloads at once. Broken: both
    added the new credential, one profile was overwritten without being dropped, and it called
    IMS nonstop."""
    source = tmp_path / "c.json"
    write_json(source, service_json(key_pair(0)))
    config = tmp_path / "config.toml"
    config.write_text(f'[profiles.one]\nfile = "{source}"\n')
    async with config_profiles(config) as (agent, profiles):
        await agent.token(name="one")
        write_json(source, service_json(key_pair(1)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(profiles.reload)
            nursery.start_soon(profiles.reload)
        await agent.token(name="one")
        ims = agent._ims
        assert isinstance(ims, FakeIMS)
        calls = len(ims.calls)
        await trio.sleep(1)  # a storm would be ten calls a second (the fake IMS takes 0.1 s)
        assert len(ims.calls) == calls == 2
        assert agent._nursery is not None
        assert len(agent._nursery.child_tasks) == 1


async def test_a_bad_config_raises_keeps_profiles_and_the_next_good_one_loads(tmp_path):
    credential = write_json(tmp_path / "c.json", service_json(key_pair(0)))
    config = tmp_path / "config.toml"
    good = f'[profiles.one]\nfile = "{credential}"\n'
    config.write_text(good)
    async with config_profiles(config) as (agent, profiles):
        config.write_text("not toml [")
        with pytest.raises(ConfigError, match=f"{config} is not valid TOML"):
            await profiles.reload()
        assert [p.name for p in agent.profiles()] == ["one"]
        config.write_text(good + '[profiles.two]\ncommand = "echo sealed >&2; exit 1"\n')
        outcome = await profiles.reload()
        assert outcome.profiles == ("one",)
        assert outcome.unloaded == {
            "two": "command `echo sealed >&2; exit 1` failed (exit 1): sealed"
        }


# ---- the real daemon


def _answer(sock: str, method: str, path: str) -> tuple[int, dict[str, object]]:
    request = f"{method} {path} HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n"
    request += "Content-Length: 0\r\n\r\n"
    return procs.raw_answer(procs.raw_exchange(sock, request.encode()))


def _names(agent: procs.AgentProcess) -> list[str]:
    return [p["name"] for p in json.loads(agent.cli("status", "--json").stdout)["profiles"]]


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sighups_during_a_slow_reload_end_with_the_newest_config(tmp_path, ims):
    """SIGHUP, and while its reload waits a second for a command, the config loses that profile
    and a few more SIGHUPs follow. Broken: each SIGHUP started a reload of its own; the newer
    ones removed the profile, then the older one finished and added it back."""
    starts = tmp_path / "starts"
    config = tmp_path / "config.toml"
    service = ims.credentials["service"]
    config.write_text(slow_profile("slow", service, starts))
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        _wait(lambda: agent.token("--profile", "slow").returncode == 0, "the first load")
        mark = len(agent.log())
        os.kill(agent.pid, signal.SIGHUP)
        _wait(lambda: lines(starts) == 2, "the reload's command")
        newest = "".join(f'[profiles.{n}]\nfile = "{service}"\n' for n in ("other1", "other2"))
        config.write_text(newest)
        for _ in range(3):
            os.kill(agent.pid, signal.SIGHUP)
            time.sleep(0.05)
        # Every load logs "config …: N profile(s)": the slow reload 1, a reload of the newest
        # config 2. Once both are logged, the slow one is over, whatever the order.
        _wait(lambda: all(f": {n} profile(s)" in agent.log()[mark:] for n in (1, 2)), "the reloads")
        assert _names(agent) == ["other1", "other2"]
        assert agent.log()[mark:].count(" profile(s)") == 2  # the SIGHUPs after it: one reload
        status, body = _answer(agent.sock, "POST", "/v1/reload")  # one more, for good measure
        assert (status, body["profiles"]) == (200, ["other1", "other2"])
        assert _names(agent) == ["other1", "other2"]
        assert lines(starts) == 2  # the newest config has no command: none ran after the slow one


def test_post_reload_reports_what_loaded_and_refuses_a_bad_config(tmp_path, ims):
    config = tmp_path / "config.toml"
    service = ims.credentials["service"]
    good = (
        f'[profiles.one]\nfile = "{service}"\n'
        "[profiles.locked]\ncommand = \"echo 'vault is sealed' >&2; exit 2\"\n"
    )
    config.write_text(good)
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        status, body = _answer(agent.sock, "POST", "/v1/reload")
        assert status == 200, body
        assert body == {
            "reloaded": True,
            "profiles": ["one"],
            "unloaded": {
                "locked": "command `echo 'vault is sealed' >&2; exit 2` failed (exit 2):"
                " vault is sealed"
            },
            "kept": {},
        }
        assert agent.cli("add", ims.credentials["oauth"], "--name", "byhand").returncode == 0

        config.write_text("this is not toml [")
        status, body = _answer(agent.sock, "POST", "/v1/reload")
        assert status == 400
        assert body["error"] == "bad_request"
        message = body["message"]
        assert isinstance(message, str)
        assert str(config) in message
        assert "not valid TOML" in message
        assert "\n" not in message
        assert _names(agent) == ["byhand", "locked", "one"]  # kept as they were

        config.write_text(f'[profiles.two]\nfile = "{service}"\n')
        config.chmod(0o666)
        status, body = _answer(agent.sock, "POST", "/v1/reload")
        assert status == 400
        message = body["message"]
        assert isinstance(message, str)
        assert "writable by others" in message
        assert str(config) in message
        assert _names(agent) == ["byhand", "locked", "one"]

        config.chmod(0o600)
        status, body = _answer(agent.sock, "POST", "/v1/reload")
        assert (status, body["profiles"], body["unloaded"]) == (200, ["two"], {})
        assert _names(agent) == ["byhand", "two"]  # a profile added by hand is never touched
        status, body = _answer(agent.sock, "GET", "/v1/reload")
        assert status == 405


def test_refresh_of_a_config_dev_token_reads_its_source_or_advises(tmp_path, ims):
    """A config-file development token: `refresh` reads its source again, so a new token put
    there is loaded (200); an unchanged source gets the advice to update it and reload."""
    del ims
    source = tmp_path / "dev.json"
    now_ms = int(time.time() * 1000)
    source.write_text(json.dumps(devtoken_json(dev_token(created_at=str(now_ms)))))
    config = tmp_path / "config.toml"
    config.write_text(f'[profiles.dev]\nfile = "{source}"\n')
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        _wait(lambda: agent.token("--profile", "dev").returncode == 0, "the first load")
        first = agent.token("--profile", "dev").stdout
        status, body = _answer(agent.sock, "POST", "/v1/profiles/dev/refresh")
        assert status == 400
        assert "update its source, then `aemagent reload`" in str(body["message"])
        source.write_text(json.dumps(devtoken_json(dev_token(created_at=str(now_ms + 1000)))))
        status, body = _answer(agent.sock, "POST", "/v1/profiles/dev/refresh")
        assert (status, body["refreshed"]) == (200, True)
        assert agent.token("--profile", "dev").stdout != first
