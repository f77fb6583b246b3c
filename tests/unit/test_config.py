"""The config file and config-file profiles: parsing, saving, sources, reloads."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from contextlib import asynccontextmanager

import pytest
import trio
from fakes import FakeIMS, FixedRandom, LinkedClock
from keys import key_pair, service_json

from aemagent.core.agent import Agent
from aemagent.daemon.config import Config, ProfileSource, load_config, parse_config, save_profile
from aemagent.daemon.sources import ConfigProfiles, read_source
from aemagent.daemon.views import describe
from aemagent.errors import ConfigError, UnavailableError


def test_missing_default_file_is_an_empty_config(tmp_path):
    config = load_config(str(tmp_path / "none.toml"))
    assert config.profiles == ()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.toml"), required=True)


def test_a_full_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        """
[agent]
https_proxy = "http://proxy.example:3128"
ca_file = "/etc/ssl/corp.pem"
ims_timeout = 15
ims_concurrency = 2
log_level = "debug"
refresh_fraction = 0.5
backoff_max = 60

[profiles.work]
file = "creds/service.json"
hosts = ["Author-p1-e2.adobeaemcloud.com"]
default = true

[profiles.vault]
command = "vault kv get -field=credential secret/aem"
timeout = 5
"""
    )
    config = load_config(str(path))
    assert config.https_proxy == "http://proxy.example:3128"
    assert config.ims_timeout == 15.0
    assert config.ims_concurrency == 2
    assert config.policy.refresh_fraction == 0.5
    assert config.policy.backoff_max == 60.0
    work, vault = config.profiles
    assert work.file == str(tmp_path / "creds" / "service.json")  # relative to the file
    assert work.hosts == ("author-p1-e2.adobeaemcloud.com",)
    assert work.default
    assert vault.command is not None
    assert vault.command.startswith("vault kv get")
    assert vault.timeout == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", "unknown key 'colour'"),
        ("[agent]\nhttps_proxi = 'x'", "unknown key agent.https_proxi"),
        ("[profiles.a]\nfile = 'x'\ncomand = 'y'", "unknown key profiles.a.comand"),
        ("[profiles.a]\nhosts = []", "exactly one of file"),
        ("[profiles.a]\nfile = 'x'\ncommand = 'y'", "exactly one of file"),
        ("[profiles.a]\nfile = ''", "non-empty string"),
        ("[profiles.'../x']\nfile = 'x'", "invalid profile name"),
        ("[agent]\nims_timeout = 'soon'", "agent.ims_timeout must be a float"),
        ("[agent]\nims_timeout = -1", "positive"),
        ("[agent]\nims_timeout = nan", "positive"),
        ("[agent]\nlog_level = 'loud'", "log_level"),
        ("[agent]\nrefresh_fraction = 1.5", "between 0 and 1"),
        (
            "[profiles.a]\nfile = 'x'\ndefault = true\n[profiles.b]\nfile='y'\ndefault = true",
            "several",
        ),
        ("[profiles]\na = 1", "profiles.a must be a table"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(str(path))
    assert str(path) in str(info.value)


def test_environment_proxy_beats_the_config_file():
    config = Config(https_proxy="http://config-proxy:1")
    assert config.proxy_for_daemon({}) == "http://config-proxy:1"
    assert config.proxy_for_daemon({"HTTPS_PROXY": "http://env:2"}) is None  # httpx reads env


def test_save_profile_is_atomic_private_and_keeps_the_rest(tmp_path):
    path = tmp_path / "dir" / "config.toml"
    save_profile(str(path), ProfileSource(name="a", file="/x/a.json", default=True))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    save_profile(
        str(path), ProfileSource(name="b", command="pass show aem", hosts=("h",), default=True)
    )
    data = tomllib.loads(path.read_text())
    assert data["profiles"]["a"] == {"file": "/x/a.json"}  # default moved to b
    assert data["profiles"]["b"] == {"command": "pass show aem", "hosts": ["h"], "default": True}
    assert [p.name for p in load_config(str(path)).profiles] == ["a", "b"]
    assert sorted(os.listdir(path.parent)) == ["config.toml"]  # no temp file left behind


def test_save_profile_refuses_to_rewrite_a_broken_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[agent]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        save_profile(str(path), ProfileSource(name="a", file="/x"))
    assert path.read_text() == "[agent]\nbogus = 1\n"


async def test_read_source_from_file_and_command(tmp_path):
    secret = tmp_path / "s.json"
    secret.write_text('{"a": 1}')
    assert await read_source(ProfileSource(name="a", file=str(secret))) == b'{"a": 1}'
    out = await read_source(ProfileSource(name="a", command="printf '%s' \"$((6*7))\""))
    assert out == b"42"
    # stdin is closed: a command that would wait for input does not hang
    assert await read_source(ProfileSource(name="a", command="cat; echo done")) == b"done\n"


async def test_read_source_errors_carry_the_first_stderr_line(tmp_path):
    with pytest.raises(UnavailableError, match=r"exit 3\): vault is sealed$"):
        await read_source(
            ProfileSource(name="a", command="echo 'vault is sealed' >&2; echo more >&2; exit 3")
        )
    with pytest.raises(UnavailableError, match="did not finish within 0.2 s"):
        await read_source(ProfileSource(name="a", command="sleep 10", timeout=0.2))
    with pytest.raises(UnavailableError, match="cannot read"):
        await read_source(ProfileSource(name="a", file=str(tmp_path / "missing")))


@asynccontextmanager
async def agent_with_config(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    clock = LinkedClock()
    ims = FakeIMS(clock)
    async with trio.open_nursery() as nursery:
        agent = Agent(ims, clock=clock, rng=FixedRandom(0.0))
        await nursery.start(agent.run)
        profiles = ConfigProfiles(agent, load_config(str(path)))
        profiles.reserve()
        await profiles.load()
        yield agent, profiles, path, ims
        nursery.cancel_scope.cancel()


def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


async def test_reload_keeps_unchanged_tokens_and_touches_only_config_profiles(tmp_path):
    one = write_json(tmp_path / "one.json", service_json(key_pair(0)))
    two = write_json(tmp_path / "two.json", service_json(key_pair(1)))
    text = f'[profiles.one]\nfile = "{one}"\n[profiles.two]\nfile = "{two}"\n'
    async with agent_with_config(tmp_path, text) as (agent, profiles, path, ims):
        await agent.add((await _parse(service_json(key_pair(2)))), name="mine")
        before = {n: (await agent.token(name=n)).token.reveal() for n in ("one", "two", "mine")}
        # `two` changes credential, `one` is unchanged, a third appears; `mine` is not in the file
        write_json(tmp_path / "two.json", service_json(key_pair(3)))
        path.write_text(text.replace("[profiles.one]", "[profiles.three]"))
        await profiles.reload()
        names = [p.name for p in agent.profiles()]
        assert names == ["mine", "three", "two"]  # `one` was removed from the file
        assert (await agent.token(name="mine")).token.reveal() == before["mine"]
        assert (await agent.token(name="two")).token.reveal() != before["two"]
        # `three` has `one`'s old credential: a new profile, so a new token
        path.write_text(text.replace("[profiles.one]", "[profiles.three]"))
        calls = len(ims.calls)
        await profiles.reload()
        assert len(ims.calls) == calls  # nothing changed: no IMS call, tokens kept


async def test_a_source_that_fails_shows_its_error_and_refresh_retries(tmp_path):
    flag = tmp_path / "unlocked"
    creds = write_json(tmp_path / "c.json", service_json())
    command = f"test -e {flag} || {{ echo 'the vault is locked' >&2; exit 1; }}; cat {creds}"
    text = f"[profiles.locked]\ncommand = '''{command}'''\n"
    async with agent_with_config(tmp_path, text) as (agent, profiles, _path, _ims):
        profile = agent.resolve("locked")
        assert profile.state(agent.now()) == "unloaded"
        assert "the vault is locked" in describe(profile, agent.now())["last_error"]
        with pytest.raises(UnavailableError, match="the vault is locked.*aemagent refresh locked"):
            await agent.token(name="locked")
        flag.touch()
        await profiles.load_one(profiles.source("locked"))
        assert (await agent.token(name="locked")).profile.credential.client_id == "cm-p123-e1234"


async def _parse(obj):
    from aemagent.credentials import parse_credential

    return parse_credential(obj)


def test_parse_config_accepts_an_empty_document():
    assert parse_config({}, "x").profiles == ()


def test_a_config_file_others_can_write_is_refused(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[profiles.a]\ncommand = "echo {}"\n')
    path.chmod(0o664)
    with pytest.raises(ConfigError, match=r"writable by others \(mode 0664\).*chmod go-w"):
        load_config(str(path))
    path.chmod(0o644)
    assert load_config(str(path)).profiles[0].name == "a"
    os.chown(path, 65534, 65534)  # the tests run as root; as a user this is someone else's
    if os.getuid() == 0:
        with pytest.raises(ConfigError, match="belongs to uid 65534, not to you"):
            load_config(str(path))


def test_save_removes_temporaries_of_killed_saves(tmp_path):
    path = tmp_path / "config.toml"
    dead = tmp_path / ".config.toml.999999999.tmp"  # no such pid
    alive = tmp_path / f".config.toml.{os.getppid()}.tmp"  # a live process: maybe mid-save
    dead.write_text("half")
    alive.write_text("half")
    save_profile(str(path), ProfileSource(name="a", file="/x"))
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.toml", alive.name])


async def test_keys_are_parsed_once_per_distinct_bytes_and_not_again_on_reload(
    tmp_path, monkeypatch
):
    """Checking an RSA key costs real CPU time. Profiles reading the same bytes parse them once,
    a reload whose bytes did not change parses nothing, changed bytes are parsed again, and no
    credential outlives its profile in the cache. Broken: one parse per profile and reload."""
    import aemagent.daemon.sources
    from aemagent.credentials import parse_credential as real_parse

    parsed: list[bytes] = []

    def counting_parse(raw):
        parsed.append(raw)
        return real_parse(raw)

    monkeypatch.setattr(aemagent.daemon.sources, "parse_credential", counting_parse)
    shared = write_json(tmp_path / "shared.json", service_json(key_pair(0)))
    own = write_json(tmp_path / "own.json", service_json(key_pair(1)))
    text = "".join(f'[profiles.s{i}]\nfile = "{shared}"\n' for i in range(5))
    text += f'[profiles.own]\nfile = "{own}"\n'
    async with agent_with_config(tmp_path, text) as (agent, profiles, _path, _ims):
        assert len(parsed) == 2  # five profiles on one file, one on another
        assert {agent.resolve(f"s{i}").credential for i in range(5)} == {
            agent.resolve("s0").credential
        }
        assert not profiles._this_load  # nothing held once the load is over
        tokens = {p.name: (await agent.token(name=p.name)).token.reveal() for p in agent.profiles()}
        await profiles.reload()
        assert len(parsed) == 2  # unchanged bytes: nothing parsed again
        assert tokens == {
            p.name: (await agent.token(name=p.name)).token.reveal() for p in agent.profiles()
        }
        write_json(tmp_path / "own.json", service_json(key_pair(2)))
        await profiles.reload()
        assert len(parsed) == 3  # the changed file only
        agent.forget("s3")  # by hand: the next reload brings it back, parsed anew
        await profiles.reload()
        assert len(parsed) == 4
        assert agent.resolve("s3").credential.digest == agent.resolve("s0").credential.digest
