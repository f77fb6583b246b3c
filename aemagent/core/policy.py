"""When to refresh a token, how long to back off, and whether a token may be served.

Theory of operation
-------------------
This module is pure: every function takes the time as a `Now` (wall clock and suspend-counting
boot clock, read together) and, where randomness is involved, a `draw` in [0, 1). Nothing here
sleeps, reads a clock or touches the network, so every rule below is tested with exact numbers.

* A fetched token expires at (local send time + lifetime) on BOTH clocks. Its remaining time is
  the smaller of the two readings, so a laptop that slept (boot clock advanced, monotonic did not)
  or whose wall clock jumped forward never serves an expired token.
* A refreshable token is renewed once its remaining time drops below `refresh_margin`: a quarter
  of its lifetime plus a few percent of jitter drawn once per token, so many profiles fetched at
  the same moment do not all refresh at the same moment (no refresh storms at IMS).
* Transient failures back off exponentially with full jitter (a floor of `backoff_initial`, up to
  `backoff_max`), never sooner than IMS's `Retry-After`. Retry times live on the boot clock, which
  never goes backwards. Permanent failures block automatic refreshes until a manual one.
* Whatever the margin says, the timer never refreshes sooner than `min_refresh_interval` (30 s,
  at most half the lifetime) after the last successful fetch: a margin as long as the lifetime
  (a refresh_fraction plus jitter near 1) must not become a loop of IMS requests.
* `min_valid` is a hard condition on the token served. Without one, the default is 60 s capped at
  a quarter of the lifetime, so short-lived test tokens still serve. One a fresh token cannot
  meet is a usage error, known before any IMS request once the lifetime is known: a token
  is served some time after IMS made it, so it always has less than the lifetime less
  `fetch_margin` (a second, at most a tenth of the lifetime) left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aemagent.core.clocks import Now
from aemagent.errors import UsageError


@dataclass(frozen=True)
class PolicySettings:
    refresh_fraction: float = 0.25
    # Extra fraction of the lifetime, drawn per token, so refreshes spread out.
    refresh_jitter: float = 0.05
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    default_min_valid: float = 60.0
    # The daemon re-checks both clocks at least this often, whatever the timers say; the agent
    # puts every profile's re-check on one grid of this period (clocks.on_grid): one wake-up.
    wake_interval: float = 60.0
    # A request waits at most this long for IMS before it is answered 503.
    request_wait: float = 20.0
    # Forced refreshes (git `erase`, a client's retry after a 401) at most this often.
    forced_refresh_interval: float = 60.0
    # The timer's refreshes at most this often (capped at half the lifetime), whatever the margin.
    min_refresh_interval: float = 30.0
    # What a fresh token has lost, at least, by the time it is served (the round trip to IMS;
    # capped at a tenth of the lifetime): a min_valid of the lifetime less this or more is
    # refused. Small on purpose: asking for "nearly the whole lifetime" to force a fetch works.
    fetch_margin: float = 1.0


@dataclass(frozen=True)
class TokenTimes:
    """When one token dies, on both clocks, and when to replace it."""

    lifetime: float
    wall_expiry: float
    boot_expiry: float
    refresh_margin: float

    def remaining(self, now: Now) -> float:
        return min(self.wall_expiry - now.wall, self.boot_expiry - now.boot)

    def valid_for(self, now: Now, seconds: float) -> bool:
        remaining = self.remaining(now)
        return remaining > 0 and remaining >= seconds

    def refresh_due(self, now: Now) -> bool:
        return self.remaining(now) <= self.refresh_margin

    @property
    def fetched_boot(self) -> float:
        """The boot-clock time the token was asked for (its expiry less its lifetime)."""
        return self.boot_expiry - self.lifetime

    def refresh_at_wall(self, now: Now) -> float:
        """The wall-clock time the refresh is due, as `status` shows it."""
        return now.wall + self.remaining(now) - self.refresh_margin


def fetched_token_times(
    lifetime: float, sent: Now, draw: float, settings: PolicySettings
) -> TokenTimes:
    """Times of a token the agent fetched: expiry is local send time + lifetime."""
    margin = lifetime * (settings.refresh_fraction + settings.refresh_jitter * draw)
    return TokenTimes(lifetime, sent.wall + lifetime, sent.boot + lifetime, margin)


def fixed_token_times(lifetime: float, wall_expiry: float, now: Now) -> TokenTimes:
    """Times of a token with an expiry stamped by IMS (a development token): never refreshed.

    The boot-clock expiry is derived from the remaining time now, so a suspend after loading it
    still counts.
    """
    return TokenTimes(lifetime, wall_expiry, now.boot + (wall_expiry - now.wall), 0.0)


def effective_min_valid(
    requested: float | None, lifetime: float, settings: PolicySettings
) -> float:
    """The validity a served token must still have; an impossible request is a usage error."""
    if requested is None:
        return min(settings.default_min_valid, lifetime / 4)
    if requested < 0:
        raise UsageError(f"min_valid must not be negative, got {requested:g}")
    margin = min(settings.fetch_margin, lifetime / 10)
    if requested >= lifetime - margin:
        raise UsageError(
            f"min_valid {requested:g} s is longer than a fresh token is valid when served:"
            f" it lives {round(lifetime, 1):g} s, less {round(margin, 1):g} s for fetching it;"
            f" ask for less than {round(lifetime - margin, 1):g} s"
        )
    return requested


def backoff_delay(
    failures: int, draw: float, retry_after: float | None, settings: PolicySettings
) -> float:
    """Seconds to wait after the `failures`-th transient failure in a row (failures >= 1)."""
    ceiling = min(settings.backoff_max, settings.backoff_initial * 2.0 ** min(failures - 1, 60))
    delay = settings.backoff_initial + (ceiling - settings.backoff_initial) * draw
    if retry_after is not None and retry_after > delay:
        # Retry-After is honoured even beyond backoff_max, but not beyond an hour: a server
        # asking for more is broken, and the token would expire meanwhile anyway.
        delay = min(retry_after, 3600.0)
    return delay


@dataclass
class Schedule:
    """The refresh state of one profile. Mutated by events; read by decisions."""

    settings: PolicySettings
    refreshable: bool = True
    token: TokenTimes | None = None
    failures: int = 0
    retry_at: float | None = None  # boot clock
    blocked: bool = False  # a permanent failure: only a manual refresh unblocks
    forced_at: float | None = field(default=None)  # boot clock of the last forced refresh

    # events

    def on_success(self, times: TokenTimes) -> None:
        self.token = times
        self.failures = 0
        self.retry_at = None
        self.blocked = False

    def on_failure(
        self, now: Now, *, transient: bool, retry_after: float | None, draw: float
    ) -> None:
        if not transient:
            self.blocked = True
            self.retry_at = None
            return
        self.failures += 1
        self.retry_at = now.boot + backoff_delay(self.failures, draw, retry_after, self.settings)

    def on_manual(self) -> None:
        """A refresh asked for by hand: forget blocks and backoff."""
        self.blocked = False
        self.failures = 0
        self.retry_at = None

    def allow_forced(self, now: Now) -> bool:
        """Whether a forced refresh may run now; records it if so."""
        interval = self.settings.forced_refresh_interval
        if self.forced_at is not None and now.boot - self.forced_at < interval:
            return False
        self.forced_at = now.boot
        return True

    # decisions

    def usable(self, now: Now, min_valid: float) -> bool:
        return self.token is not None and self.token.valid_for(now, min_valid)

    def backing_off(self, now: Now) -> bool:
        return self.retry_at is not None and now.boot < self.retry_at

    def may_fetch(self, now: Now) -> bool:
        """Whether an IMS call for this profile is allowed now (by anyone)."""
        return self.refreshable and not self.blocked and not self.backing_off(now)

    def refresh_due(self, now: Now) -> bool:
        """Whether the timer should fetch a new token now."""
        if not self.may_fetch(now):
            return False
        if self.token is None:
            return True
        return self.token.refresh_due(now) and now.boot >= self._earliest_refresh()

    def _earliest_refresh(self) -> float:
        """Boot time before which the timer does not refresh the token (min_refresh_interval)."""
        assert self.token is not None
        floor = min(self.settings.min_refresh_interval, self.token.lifetime / 2)
        return self.token.fetched_boot + floor

    def seconds_until_due(self, now: Now) -> float:
        """How long the timer may sleep before deciding again: never longer than wake_interval."""
        wait = self.settings.wake_interval
        if self.refreshable and not self.blocked:
            if self.retry_at is not None:
                wait = min(wait, self.retry_at - now.boot)
            elif self.token is not None:
                due = self.token.remaining(now) - self.token.refresh_margin
                wait = min(wait, max(due, self._earliest_refresh() - now.boot))
            else:
                wait = 0.0
        return max(0.0, wait)

    def next_refresh_wall(self, now: Now) -> float | None:
        """When the next automatic refresh will happen, on the wall clock, for `status`."""
        if not self.refreshable or self.blocked:
            return None
        if self.retry_at is not None:
            return now.wall + max(0.0, self.retry_at - now.boot)
        if self.token is None:
            return now.wall
        earliest = now.wall + self._earliest_refresh() - now.boot
        return max(now.wall, self.token.refresh_at_wall(now), earliest)
