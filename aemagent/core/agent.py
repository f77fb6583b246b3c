"""The profiles the agent holds, and their tokens: the lifecycle (add, serve, refresh, forget).

Which profile a request is for is `core.profiles.ProfileTable`'s job; what the agent tells a
caller who gets no token, and logs of a profile's tokens, is `core.messages`'s.

Theory of operation
-------------------
Each profile owns a small nursery inside the agent's task tree, under a cancel scope that forgetting
or replacing the profile cancels. In it run:

* the profile's timer: asks the pure `Schedule` (`core.policy`) whether a refresh is due, starts one
  if so, then sleeps until the next decision, never longer than a minute, and re-reads both clocks
  on every wake-up (so a laptop that slept through the refresh time refreshes at once). A sleep
  that is only that once-a-minute re-check ends on the next whole minute of trio's clock
  (`clocks.on_grid`), the same instant for every profile, so an idle agent wakes once a minute
  whatever its number of profiles; a refresh, retry or lifetime end due sooner is slept to exactly;
* at most one *flight*: an IMS call for this profile. Requests that need a token while a flight
  is up wait for it and share its result. A flight runs in the profile's nursery, not in the
  requester's task, so a caller that hangs up does not cancel it. A global `CapacityLimiter`
  caps concurrent IMS calls across profiles.

A flight's result is applied only if its profile is still the current one under that name; a
profile forgotten or replaced meanwhile is a different object (a new generation), so the old
identity's token can never reach it. Every state change sets the profile's `changed` event, which
waiting requests and the timer sleep on.

Adds of one name may run concurrently (two `aemagent add` at once, overlapping reloads): `add`
decides who holds the name again after starting its profile's tasks, and drops whatever it
replaces. As a second guard, a profile that is no longer the current one ends at its next flight
result or timer wake-up: its results are discarded, so its refresh would otherwise stay due and
its timer fetch again at once, forever.

A manual refresh that meets a transient IMS error is not given up: the profile keeps wanting a
new token, and its timer retries with backoff even while the current token is not yet due.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import random
from dataclasses import dataclass

import trio

from aemagent.core import messages
from aemagent.core.clocks import Clock, Now, SystemClock, on_grid
from aemagent.core.policy import (
    PolicySettings,
    Schedule,
    effective_min_valid,
    fetched_token_times,
    fixed_token_times,
)
from aemagent.core.profiles import (
    Flight,
    Profile,
    ProfileTable,
    Served,
    Unloaded,
    check_profile_name,
    identity_text,
    same_identity,
)
from aemagent.core.source import TokenSource
from aemagent.credentials import Credential, DevToken, Secret
from aemagent.errors import (
    AemAgentError,
    AmbiguousError,
    IMSError,
    IMSTransientError,
    NotFoundError,
    UnavailableError,
    UsageError,
)

log = logging.getLogger("aemagent.agent")

# Concurrent IMS calls across all profiles: many profiles due at once must not storm IMS.
DEFAULT_IMS_CONCURRENCY = 4
# A development token counts as expired this long before the expiry IMS stamped into it.
DEV_TOKEN_MARGIN = 30.0


@dataclass(frozen=True)
class _AddSettings:
    """What `Agent.add` sets on a profile besides its credential."""

    hosts: tuple[str, ...]
    default: bool
    source: str
    forget_at: float | None


class Agent:
    """Holds the profiles; serves, refreshes and forgets their tokens."""

    def __init__(
        self,
        ims: TokenSource,
        *,
        clock: Clock | None = None,
        settings: PolicySettings | None = None,
        ims_concurrency: int = DEFAULT_IMS_CONCURRENCY,
        rng: random.Random | None = None,
    ) -> None:
        self._ims = ims
        self._clock = clock or SystemClock()
        self.settings = settings or PolicySettings()
        self._ims_limit = trio.CapacityLimiter(ims_concurrency)
        self._rng = rng or random.Random()
        self._table = ProfileTable()
        self._generations = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        # Set, then replaced, each time `add` publishes a profile under a name: what a task
        # waiting for a name that is not there yet waits on (daemon/sinks.py).
        self.published = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled: the parent of every profile's timer and flights."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def now(self) -> Now:
        return self._clock.now()

    # ---- management

    def profiles(self) -> list[Profile]:
        return self._table.sorted()

    def find(self, name: str) -> Profile | None:
        return self._table.find(name)

    def resolve(self, name: str | None = None, url: str | None = None) -> Profile:
        """The profile a request is for: by name, by a URL's host, or the default."""
        return self._table.resolve(name, url)

    def add_unloaded(
        self, name: str, error: str, hosts: tuple[str, ...] = (), default: bool = False
    ) -> Profile:
        """A config-file profile whose credential could not be read: it shows why."""
        profile = Profile(
            name=check_profile_name(name),
            credential=Unloaded(error),
            generation=next(self._generations),
            schedule=Schedule(self.settings, refreshable=False),
            hosts=hosts,
            source="config",
        )
        old = self._table.find(name)
        if old is not None:
            self._drop(old)
        self._table.put(profile, default=default)
        return profile

    async def add(
        self,
        credential: Credential,
        *,
        name: str | None = None,
        hosts: tuple[str, ...] = (),
        default: bool = False,
        source: str = "added",
        lifetime: float | None = None,
    ) -> Profile:
        """Load a credential. An explicit name replaces; a derived name that collides is refused.

        The profile's tasks start before it is published, and another add of the same name may
        publish its own profile meanwhile: who holds the name is decided again after that await,
        so a replaced profile is always dropped with its tasks (never left running unseen)."""
        assert self._nursery is not None, "Agent.run() is not running"
        explicit = name is not None
        name = check_profile_name(name if name is not None else credential.default_name())
        if lifetime is not None and lifetime <= 0:
            raise UsageError("lifetime must be positive")
        now = self.now()
        forget_at = now.boot + lifetime if lifetime is not None else None
        settings = _AddSettings(hosts, default, source, forget_at)
        kept = self._keep_if_unchanged(name, credential, explicit, settings)
        if kept is not None:
            return kept
        profile = Profile(
            name=name,
            credential=credential,
            generation=next(self._generations),
            schedule=Schedule(self.settings, refreshable=credential.refreshable),
            hosts=hosts,
            source=source,
            forget_at=forget_at,
        )
        if isinstance(credential, DevToken):
            self._load_dev_token(profile, credential, now)
        # Start the profile's tasks first (its timer waits for `published`), then publish it in
        # one synchronous step, so no request ever sees a profile without its nursery.
        await self._nursery.start(self._run_profile, profile)
        try:
            kept = self._keep_if_unchanged(name, credential, explicit, settings)
        except BaseException:
            profile.scope.cancel()
            raise
        if kept is not None:  # a concurrent add of the same credential won: ours never ran
            profile.scope.cancel()
            return kept
        old = self._table.find(name)
        if old is not None:
            self._drop(old)
        self._table.put(profile, default=default)
        profile.published.set()
        event, self.published = self.published, trio.Event()
        event.set()
        replaced = old is not None and not isinstance(old.credential, Unloaded)
        log.info("profile %s: %s %s", name, "replaced with" if replaced else "added", credential)
        return profile

    def _keep_if_unchanged(
        self, name: str, credential: Credential, explicit: bool, settings: _AddSettings
    ) -> Profile | None:
        """The current holder of `name` if it holds this very credential (it takes the new
        settings and keeps its token); refuses a derived name held by another identity."""
        old = self._table.find(name)
        if old is None:
            return None
        if not explicit and not same_identity(old.credential, credential):
            raise AmbiguousError(
                f"a profile named {name} already holds another credential"
                f" ({identity_text(old.credential)}); add this one with --name NAME"
            )
        if old.credential.digest != credential.digest:
            return None
        # The same credential again: keep its token, take the new settings, and lift a
        # permanent-failure block (adding a credential again counts as a manual retry).
        old.hosts, old.source, old.forget_at = settings.hosts, settings.source, settings.forget_at
        self._table.set_default(old, settings.default)
        if old.schedule.blocked:
            old.schedule.on_manual()
            old.notify()
        log.info("profile %s: credential unchanged, token kept", name)
        return old

    def _load_dev_token(self, profile: Profile, token: DevToken, now: Now) -> None:
        """A development token is its own token: served until it expires, never refreshed."""
        if token.expired(now.wall + DEV_TOKEN_MARGIN):
            raise messages.expired_dev_token(token)
        profile.token = token.token
        # IMS's clock stamped its expiry; a local clock running slow would make it look valid
        # too long, so it counts as expired a little early.
        profile.schedule.on_success(
            fixed_token_times(token.lifetime, token.expires_at - DEV_TOKEN_MARGIN, now)
        )

    def forget(self, name: str) -> Profile:
        profile = self._table.find(name)
        if profile is None:
            raise NotFoundError(self._table.no_such_profile(name))
        self._drop(profile)
        log.info("profile %s: forgotten", name)
        return profile

    def forget_all(self) -> list[Profile]:
        dropped = self.profiles()
        for profile in dropped:
            self._drop(profile)
        if dropped:
            log.info("forgot all profiles (%d)", len(dropped))
        return dropped

    def _drop(self, profile: Profile) -> None:
        self._table.remove(profile)
        profile.scope.cancel()
        profile.token = None
        profile.notify()

    # ---- serving

    async def token(
        self, *, name: str | None = None, url: str | None = None, min_valid: float | None = None
    ) -> Served:
        """A token valid for at least `min_valid` s, waiting at most `request_wait` s for IMS."""
        served = self._usable(self.resolve(name, url), min_valid)
        if served is not None:  # the usual case: no timeout scope, no waiting
            return served
        wait = self.settings.request_wait
        with trio.move_on_after(wait):
            return await self._token(name, url, min_valid)
        raise messages.no_answer(self.resolve(name, url), wait)

    async def _token(self, name: str | None, url: str | None, min_valid: float | None) -> Served:
        fetches_seen: dict[int, int] = {}
        while True:
            profile = self.resolve(name, url)
            served = self._usable(profile, min_valid)
            if served is not None:
                return served
            schedule, now = profile.schedule, self.now()
            fetches_seen.setdefault(profile.generation, profile.fetches)
            need = 0.0 if min_valid is None else min_valid
            if schedule.token is not None:
                need = effective_min_valid(min_valid, schedule.token.lifetime, self.settings)
            if profile.flight is None:
                fetched = profile.fetches > fetches_seen[profile.generation]
                messages.raise_unless_fetch_can_help(profile, now, need, fetched)
                if schedule.may_fetch(now):
                    self._start_flight(profile)
            await profile.changed.wait()

    def _usable(self, profile: Profile, min_valid: float | None) -> Served | None:
        """The profile's token if it is valid for long enough now, else None."""
        times = profile.schedule.token
        if profile.token is None or times is None:
            return None
        now = self.now()
        need = effective_min_valid(min_valid, times.lifetime, self.settings)
        return self._served(profile, now) if profile.schedule.usable(now, need) else None

    def _served(self, profile: Profile, now: Now) -> Served:
        times = profile.schedule.token
        assert times is not None
        assert profile.token is not None
        remaining = times.remaining(now)
        return Served(profile, profile.token, now.wall + remaining, remaining)

    async def refresh(self, name: str) -> Profile:
        """A manual refresh: lifts blocks and backoff, fetches now, waits for the result.

        If IMS fails transiently, the refresh is not given up: the timer retries it with backoff
        until a new token arrives (or a permanent failure), even while the old one is not due."""
        profile = self.resolve(name)
        refused = messages.refresh_refused(profile)
        if refused is not None:
            raise refused
        profile.schedule.on_manual()
        profile.refresh_wanted = True
        try:
            await self._await_flight(profile, profile.flight or self._start_flight(profile))
        except IMSTransientError as exc:
            current = self._table.is_current(profile)
            raise UnavailableError(
                messages.retrying(profile, exc, self.now(), current=current)
            ) from None
        return profile

    async def force_refresh(self, name: str, if_current: str) -> tuple[Profile, bool]:
        """A refresh asked for by a caller whose token was refused (git `erase`, a 401 retry).

        Only if the caller's token (given as its SHA-256) is still the current one, at most once
        a minute per profile, never past a permanent-failure block or a backoff: callers that
        loop on 401s must not become a way to hammer IMS.
        """
        profile = self.resolve(name)
        schedule, now = profile.schedule, self.now()
        current = profile.token
        if (
            current is None
            or not hmac.compare_digest(_sha256(current.reveal()), if_current.lower())
            or not schedule.may_fetch(now)
        ):
            return profile, False
        if profile.flight is None and not schedule.allow_forced(now):
            return profile, False
        log.info("profile %s: forced refresh (a caller's token was refused)", name)
        await self._await_flight(profile, profile.flight or self._start_flight(profile))
        return profile, True

    async def _await_flight(self, profile: Profile, flight: Flight) -> None:
        wait = self.settings.request_wait
        with trio.move_on_after(wait):
            await flight.done.wait()
        if not flight.done.is_set():
            raise UnavailableError(f"profile {profile.name}: IMS did not answer within {wait:g} s")
        if flight.error is not None:
            raise flight.error
        if not self._table.is_current(profile):
            # Its flight was cancelled or its result discarded: nothing was refreshed.
            raise UnavailableError(
                f"profile {profile.name} was forgotten or replaced while it was being refreshed"
            )

    async def revoke(self, profile: Profile, token: Secret | None) -> str:
        """Best effort: ask IMS to invalidate a forgotten profile's token; says what happened."""
        if token is None:
            return "no token to revoke"
        credential = profile.credential
        if isinstance(credential, Unloaded) or not profile.schedule.refreshable:
            return "a development token cannot be revoked by the agent; it expires on its own"
        try:
            with trio.fail_after(self.settings.request_wait):
                async with self._ims_limit:
                    return await self._ims.revoke(credential, token)
        except trio.TooSlowError:
            return f"revocation failed: IMS did not answer within {self.settings.request_wait:g} s"
        except AemAgentError as exc:
            return f"revocation failed: {exc}"

    # ---- the tasks

    def _start_flight(self, profile: Profile) -> Flight:
        assert profile.nursery is not None
        assert profile.flight is None
        flight = profile.flight = Flight()
        profile.nursery.start_soon(self._fly, profile, flight)
        profile.notify()
        return flight

    async def _fly(self, profile: Profile, flight: Flight) -> None:
        try:
            async with self._ims_limit:
                credential = profile.credential
                assert not isinstance(credential, Unloaded), "unloaded profiles never fly"
                grant = await self._ims.fetch(credential)
        except IMSError as exc:
            self._failed(profile, flight, exc)
        except Exception as exc:  # a bug: keep the daemon up, count it as transient
            log.exception("profile %s: unexpected error while fetching a token", profile.name)
            self._failed(
                profile, flight, IMSTransientError(f"internal error ({type(exc).__name__})")
            )
        else:
            if self._table.is_current(profile):
                times = fetched_token_times(
                    grant.lifetime, grant.sent, self._rng.random(), self.settings
                )
                profile.token = grant.access_token
                profile.refresh_wanted = False
                profile.schedule.on_success(times)
                profile.fetches += 1
                profile.last_error = None
                messages.log_new_token(profile, times, self.now())
        finally:
            profile.flight = None
            flight.done.set()
            profile.notify()
            if not self._table.is_current(profile):
                # Forgotten or replaced meanwhile: its result was discarded, so its refresh is
                # still due; nothing of it may run on (its timer would fetch again at once).
                self._drop(profile)

    def _failed(self, profile: Profile, flight: Flight, exc: IMSError) -> None:
        flight.error = exc
        if not self._table.is_current(profile):
            return
        now = self.now()
        profile.last_error = exc
        profile.schedule.on_failure(
            now, transient=exc.transient, retry_after=exc.retry_after, draw=self._rng.random()
        )
        if not exc.transient:
            profile.refresh_wanted = False
        messages.log_failure(profile, exc, now)

    async def _run_profile(self, profile: Profile, *, task_status: trio.TaskStatus[None]) -> None:
        with profile.scope:
            async with trio.open_nursery() as nursery:
                profile.nursery = nursery
                task_status.started()
                await profile.published.wait()
                await self._timer(profile)

    async def _timer(self, profile: Profile) -> None:
        schedule = profile.schedule
        while True:
            if not self._table.is_current(profile):
                self._drop(profile)  # not the current holder of its name: cancels this task
                await trio.lowlevel.checkpoint()
                return
            now = self.now()
            if profile.forget_at is not None and now.boot >= profile.forget_at:
                log.info("profile %s: lifetime over", profile.name)
                self._drop(profile)  # cancels this task
                await trio.lowlevel.checkpoint()
                return
            if profile.flight is None and (
                schedule.refresh_due(now) or (profile.refresh_wanted and schedule.may_fetch(now))
            ):
                self._start_flight(profile)
            period = self.settings.wake_interval
            delay = schedule.seconds_until_due(now)
            if profile.flight is not None:
                delay = period
            if profile.forget_at is not None:
                delay = min(delay, profile.forget_at - now.boot)
            # A mere re-check lands on the process's one-minute grid, shared by every profile
            # (one wake-up a minute for all of them); a refresh, retry or end due sooner is exact.
            with trio.move_on_at(on_grid(trio.current_time(), delay, period)):
                await profile.changed.wait()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
