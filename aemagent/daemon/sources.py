"""Config-file profiles in the running agent: reading their secrets, reloading on SIGHUP.

A profile's secret comes from a file or from a command's standard output (a password manager:
`op read …`, `pass show …`). A command runs through `/bin/sh -c` with standard input closed and a
timeout; if it fails, the first line of its stderr goes into the profile's error, because at
login a password manager may still be locked: the profile then shows that error, and
`aemagent refresh NAME` reads the source again.

A reload touches only config-file profiles, never ones added with `aemagent add`, and a profile
whose credential did not change keeps its token (`Agent.add` sees the same digest).

Loads and reloads run one at a time, each reading the config file afresh once it runs: an older
reload still waiting for a slow `command` can never re-add a profile a newer config removed.
Reloads asked for while one runs are coalesced: they all wait for the one next reload, which
starts after the last of them asked, and share its outcome (`ReloadOutcome`, or the
`ConfigError` of a config file that cannot be read, parsed or trusted, which keeps the profiles
as they are). A manual refresh that reads a profile's source again waits its turn too.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from dataclasses import dataclass, field

import trio

from aemagent.core.agent import Agent
from aemagent.core.profiles import Profile, Unloaded
from aemagent.credentials import Credential, parse_credential
from aemagent.daemon.config import MAX_SOURCE_BYTES, Config, ProfileSource, load_config
from aemagent.errors import AemAgentError, ConfigError, UnavailableError

log = logging.getLogger("aemagent.config")

# After each credential parsed (see load_one): a small fraction of what checking a key costs, and
# it keeps requests answered while many keys load, where a bare checkpoint let their latency climb
# (bench/scale.py measures it).
_PARSE_PAUSE = 0.002


async def read_source(source: ProfileSource) -> bytes:
    """The credential bytes from the profile's file or command."""
    if source.file is not None:
        try:
            async with await trio.open_file(source.file, "rb") as f:
                data = await f.read(MAX_SOURCE_BYTES + 1)
        except OSError as exc:
            raise UnavailableError(f"cannot read {source.file}: {exc.strerror}") from None
    else:
        assert source.command is not None
        data = await _run(source.command, source.timeout)
    if len(data) > MAX_SOURCE_BYTES:
        raise UnavailableError(f"{source.describe()} gave more than {MAX_SOURCE_BYTES} bytes")
    return data


async def _run(command: str, limit: float) -> bytes:
    with trio.move_on_after(limit) as scope:
        done = await trio.run_process(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if scope.cancelled_caught:
        raise UnavailableError(f"command `{command}` did not finish within {limit:g} s")
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        said = f": {lines[0][:200]}" if lines else ""
        raise UnavailableError(f"command `{command}` failed (exit {done.returncode}){said}")
    return bytes(done.stdout)


@dataclass(frozen=True)
class ReloadOutcome:
    """What a load of the config file's profiles left loaded, for `POST /v1/reload`."""

    profiles: tuple[str, ...] = ()  # config profiles with a credential loaded
    unloaded: dict[str, str] = field(default_factory=dict)  # name: why it has no credential
    # Profiles still serving the credential they had, because their source failed this time.
    kept: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "reloaded": True,
            "profiles": list(self.profiles),
            "unloaded": dict(self.unloaded),
            "kept": dict(self.kept),
        }


class ConfigProfiles:
    """Loads the config file's profiles into the agent, at start and on every SIGHUP."""

    def __init__(self, agent: Agent, config: Config) -> None:
        self._agent = agent
        self.config = config
        self._parsing = trio.Lock()
        # One load or reload at a time (FIFO). Reloads are numbered as they are asked for;
        # `_settled` is the number of the last one covered by a finished reload, whose outcome
        # (or config error) is `_settled_as`.
        self._loading = trio.Lock()
        self._asked = 0
        self._settled = 0
        self._settled_as: ReloadOutcome | str = ReloadOutcome()  # or the config error's text
        # Why each source failed during the current load (names of profiles it kept serving).
        self._failed: dict[str, str] = {}
        # Which bytes each config profile's credential was parsed from (sha256), and that
        # credential's digest: a reload whose bytes did not change reuses the live profile's
        # credential instead of parsing (checking) its RSA key again. Hashes only: a forgotten
        # credential is never kept alive here.
        self._parsed_from: dict[str, tuple[str, str]] = {}
        # During one load(): credentials parsed in it, by the sha256 of their bytes, so that
        # profiles reading the same file parse it once. Emptied when the load ends.
        self._this_load: dict[str, Credential] = {}
        # Set, then replaced, each time a reload has read a new `config` (daemon/sinks.py).
        self.config_read = trio.Event()

    async def reload(self) -> ReloadOutcome:
        """Read the config file again, then load every profile in it; what is loaded now.

        Raises `ConfigError` (the profiles stay as they are) if the file cannot be read, parsed
        or trusted. Called while a reload runs, waits for it and then for the one next reload,
        shared by every caller that asked meanwhile."""
        self._asked += 1
        ticket = self._asked
        async with self._loading:
            if self._settled < ticket:
                covers = self._asked  # everyone who asked so far sees the config as it is now
                self._settled_as = await self._reload()
                self._settled = covers
            settled = self._settled_as
        if isinstance(settled, str):
            raise ConfigError(settled)
        return settled

    async def _reload(self) -> ReloadOutcome | str:
        try:
            self.config = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload: %s; keeping the profiles as they are", exc)
            return str(exc)
        event, self.config_read = self.config_read, trio.Event()
        event.set()
        return await self._load()

    def reserve(self) -> None:
        """Register every config profile as 'loading' before the socket serves (no 404 race)."""
        for source in self.config.profiles:
            if self._agent.find(source.name) is None:
                self._agent.add_unloaded(
                    source.name, "its credential is still being read", source.hosts, source.default
                )

    async def load(self) -> ReloadOutcome:
        """Load every profile of the config as it was read (at start: no file read again)."""
        async with self._loading:
            return await self._load()

    async def _load(self) -> ReloadOutcome:
        wanted = {source.name: source for source in self.config.profiles}
        self._parsed_from = {n: v for n, v in self._parsed_from.items() if n in wanted}
        for profile in self._agent.profiles():
            if profile.source == "config" and profile.name not in wanted:
                self._agent.forget(profile.name)
        self._failed = {}
        try:
            async with trio.open_nursery() as nursery:
                for source in wanted.values():
                    nursery.start_soon(self.load_one, source)
            log.info("config %s: %d profile(s)", self.config.path, len(wanted))
            return self._outcome(wanted)
        finally:
            self._this_load.clear()
            self._failed = {}

    def _outcome(self, wanted: dict[str, ProfileSource]) -> ReloadOutcome:
        loaded: list[str] = []
        unloaded: dict[str, str] = {}
        kept: dict[str, str] = {}
        for name in sorted(wanted):
            profile = self._agent.find(name)
            if profile is None:
                unloaded[name] = "not loaded (forgotten while the config was being loaded)"
            elif profile.source != "config":
                unloaded[name] = "a profile of that name was added by hand; it is left as it is"
            elif isinstance(profile.credential, Unloaded):
                unloaded[name] = profile.credential.error
            else:
                loaded.append(name)
                if name in self._failed:
                    kept[name] = f"{self._failed[name]}; still serving the credential it had"
        return ReloadOutcome(tuple(loaded), unloaded, kept)

    async def reread(self, name: str) -> None:
        """Read one profile's source again (`aemagent refresh NAME`), between two reloads, as
        the config says now, and only if it still has that profile."""
        async with self._loading:
            source = self.source(name)
            if source is not None:
                await self.load_one(source)

    async def load_one(self, source: ProfileSource) -> None:
        existing = self._agent.find(source.name)
        if existing is not None and existing.source != "config":
            log.warning(
                "config profile %s: a profile of that name was added by hand; leaving it",
                source.name,
            )
            return
        try:
            raw = await read_source(source)
            sha = hashlib.sha256(raw).hexdigest()
            # One parse at a time, with a pause after each: checking an RSA key costs
            # cryptography real CPU time under the GIL (a thread would not help), and a
            # thousand profiles parsed in one scheduler batch would stall every request for a
            # long while. A bare checkpoint is not enough: a request needs two scheduler batches
            # (accept, then its connection), each of which would hold a parse; the pause lets
            # the socket catch up between two parses.
            async with self._parsing:
                credential = self._known(sha, existing)
                if credential is None:
                    credential = parse_credential(raw)
                    self._this_load[sha] = credential
                    await trio.sleep(_PARSE_PAUSE)
        except AemAgentError as exc:
            log.error("config profile %s (%s): %s", source.name, source.describe(), exc)
            if existing is None or isinstance(existing.credential, Unloaded):
                self._agent.add_unloaded(source.name, str(exc), source.hosts, source.default)
            else:  # keep serving the credential we have; show why the new one did not load
                existing.last_error = exc
                self._failed[source.name] = str(exc)
            return
        current = self._agent.find(source.name)
        if current is not None and current.source != "config":
            log.warning(
                "config profile %s: a profile of that name was added by hand meanwhile; leaving it",
                source.name,
            )
            return
        await self._agent.add(
            credential,
            name=source.name,
            hosts=source.hosts,
            default=source.default,
            source="config",
        )
        self._parsed_from[source.name] = (sha, credential.digest)

    def _known(self, sha: str, existing: Profile | None) -> Credential | None:
        """A credential already parsed from bytes with this sha256: in this load, or the one the
        profile holds if it was parsed from the very same bytes."""
        if sha in self._this_load:
            return self._this_load[sha]
        if (
            existing is not None
            and existing.source == "config"
            and not isinstance(existing.credential, Unloaded)
            and self._parsed_from.get(existing.name) == (sha, existing.credential.digest)
        ):
            return existing.credential
        return None

    def source(self, name: str) -> ProfileSource | None:
        return next((s for s in self.config.profiles if s.name == name), None)
