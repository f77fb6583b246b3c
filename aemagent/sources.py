"""Config-file profiles in the running agent: reading their secrets, reloading on SIGHUP.

A profile's secret comes from a file or from a command's standard output (a password manager:
`op read …`, `pass show …`). A command runs through `/bin/sh -c` with standard input closed and a
timeout; if it fails, the first line of its stderr goes into the profile's error, because at
login a password manager may still be locked: the profile then shows that error, and
`aemagent refresh NAME` reads the source again.

A reload touches only config-file profiles, never ones added with `aemagent add`, and a profile
whose credential did not change keeps its token (`Agent.add` sees the same digest).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess

import trio

from aemagent.agent import Agent
from aemagent.config import MAX_SOURCE_BYTES, Config, ProfileSource, load_config
from aemagent.credentials import Credential, parse_credential
from aemagent.errors import AemAgentError, ConfigError, UnavailableError
from aemagent.profile import Profile, Unloaded

log = logging.getLogger("aemagent.config")

# After each credential parsed (see load_one): 1000 keys take 2 s longer to load, against the
# 40 s their checks cost. With 100 distinct keys loading, `GET /v1/health` took a median 60 ms and
# at most 77 ms (bench/scale.py), against 91 ms and 153 ms with a bare checkpoint.
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


class ConfigProfiles:
    """Loads the config file's profiles into the agent, at start and on every SIGHUP."""

    def __init__(self, agent: Agent, config: Config) -> None:
        self._agent = agent
        self.config = config
        self._parsing = trio.Lock()
        # Which bytes each config profile's credential was parsed from (sha256), and that
        # credential's digest: a reload whose bytes did not change reuses the live profile's
        # credential instead of parsing (checking) its RSA key again. Hashes only: a forgotten
        # credential is never kept alive here.
        self._parsed_from: dict[str, tuple[str, str]] = {}
        # During one load(): credentials parsed in it, by the sha256 of their bytes, so that
        # profiles reading the same file parse it once. Emptied when the load ends.
        self._this_load: dict[str, Credential] = {}

    async def reload(self) -> None:
        """Read the config file again, then load every profile in it."""
        try:
            self.config = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload: %s; keeping the profiles as they are", exc)
            return
        await self.load()

    def reserve(self) -> None:
        """Register every config profile as 'loading' before the socket serves (no 404 race)."""
        for source in self.config.profiles:
            if self._agent.find(source.name) is None:
                self._agent.add_unloaded(
                    source.name, "its credential is still being read", source.hosts, source.default
                )

    async def load(self) -> None:
        wanted = {source.name: source for source in self.config.profiles}
        self._parsed_from = {n: v for n, v in self._parsed_from.items() if n in wanted}
        for profile in self._agent.profiles():
            if profile.source == "config" and profile.name not in wanted:
                self._agent.forget(profile.name)
        try:
            async with trio.open_nursery() as nursery:
                for source in wanted.values():
                    nursery.start_soon(self.load_one, source)
        finally:
            self._this_load.clear()
        log.info("config %s: %d profile(s)", self.config.path, len(wanted))

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
            # One parse at a time, with a pause after each: checking an RSA key takes
            # cryptography some 40 ms of CPU under the GIL (a thread would not help), and a
            # thousand profiles parsed in one scheduler batch would stall every request for a
            # minute. A bare checkpoint is not enough: a request needs two scheduler batches
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
