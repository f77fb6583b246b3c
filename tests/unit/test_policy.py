"""The refresh policy, with exact numbers: no clocks, no sleeps."""

import pytest

from aemagent.core.clocks import Now, on_grid
from aemagent.core.policy import (
    PolicySettings,
    Schedule,
    backoff_delay,
    effective_min_valid,
    fetched_token_times,
    fixed_token_times,
)
from aemagent.errors import UsageError

S = PolicySettings()
DAY = 86400.0
T0 = Now(wall=1_800_000_000.0, boot=5_000.0)


def later(now: Now, seconds: float, *, wall_only: float = 0.0) -> Now:
    return Now(now.wall + seconds + wall_only, now.boot + seconds)


def test_expiry_is_send_time_plus_lifetime_on_both_clocks():
    times = fetched_token_times(86399.999, T0, 0.0, S)
    assert times.wall_expiry == T0.wall + 86399.999
    assert times.boot_expiry == T0.boot + 86399.999
    assert times.remaining(T0) == pytest.approx(86399.999)


def test_refresh_margin_is_a_quarter_plus_jitter():
    assert fetched_token_times(DAY, T0, 0.0, S).refresh_margin == 21600.0  # 6 h
    assert fetched_token_times(DAY, T0, 1.0, S).refresh_margin == pytest.approx(25920.0)  # 7.2 h
    assert fetched_token_times(DAY, T0, 0.5, S).refresh_margin == pytest.approx(23760.0)


def test_refresh_due_exactly_at_the_margin():
    times = fetched_token_times(DAY, T0, 0.0, S)
    assert not times.refresh_due(later(T0, 64799))
    assert times.refresh_due(later(T0, 64800))
    assert times.refresh_at_wall(T0) == T0.wall + 64800


def test_remaining_is_the_smaller_of_the_two_clocks():
    times = fetched_token_times(DAY, T0, 0.0, S)
    # A wall-clock jump forward (suspend where the boot clock is not available, NTP step):
    assert times.remaining(later(T0, 0, wall_only=80000)) == 6400
    # A suspend counted by the boot clock only (wall clock set back meanwhile):
    assert times.remaining(Now(T0.wall, T0.boot + 90000)) == -3600
    # A wall clock set backwards does not extend the token:
    assert times.remaining(Now(T0.wall - 1000, T0.boot + 100)) == DAY - 100


def test_fixed_times_for_development_tokens():
    now = Now(1000.0, 50.0)
    times = fixed_token_times(DAY, 1000.0 + 7200, now)
    assert times.remaining(now) == 7200
    assert times.boot_expiry == 50.0 + 7200
    assert times.refresh_margin == 0.0


def test_min_valid_default_is_60_s_capped_at_a_quarter_lifetime():
    assert effective_min_valid(None, DAY, S) == 60
    assert effective_min_valid(None, 120, S) == 30
    assert effective_min_valid(300, DAY, S) == 300
    assert effective_min_valid(DAY - 2, DAY, S) == DAY - 2
    assert effective_min_valid(0, DAY, S) == 0


def test_min_valid_longer_than_a_fresh_token_is_a_usage_error():
    with pytest.raises(UsageError, match="longer than a fresh token"):
        effective_min_valid(DAY + 1, DAY, S)
    with pytest.raises(UsageError):
        effective_min_valid(-1, DAY, S)


@pytest.mark.parametrize(
    ("requested", "lifetime"),
    [(DAY, DAY), (DAY - 1, DAY), (DAY - 0.5, DAY), (7.2, 8.0), (8.0, 8.0), (59.0, 60.0)],
)
def test_min_valid_at_the_lifetime_boundary_is_a_usage_error(requested, lifetime):
    """A token is served some time after IMS made it: it can never have all its lifetime left.
    Asking for it would fetch a token on every call and still fail (exit 4, not 64)."""
    with pytest.raises(UsageError, match="longer than a fresh token") as info:
        effective_min_valid(requested, lifetime, S)
    if lifetime == DAY:
        assert str(info.value) == (
            f"min_valid {requested:g} s is longer than a fresh token is valid when served:"
            " it lives 86400 s, less 1 s for fetching it; ask for less than 86399 s"
        )


def test_min_valid_just_inside_the_boundary_is_served():
    assert effective_min_valid(DAY - 1.5, DAY, S) == DAY - 1.5
    assert effective_min_valid(7.1, 8.0, S) == 7.1  # a tenth of a short lifetime is the margin


@pytest.mark.parametrize(
    ("failures", "draw", "expected"),
    [
        (1, 0.0, 1.0),
        (1, 0.99, 1.0),  # first retry: exactly backoff_initial
        (2, 0.0, 1.0),
        (2, 1.0, 2.0),
        (3, 0.5, 2.5),  # uniform in [1, 4]
        (9, 1.0, 256.0),
        (10, 1.0, 300.0),  # capped at 5 min
        (50, 0.5, 150.5),
    ],
)
def test_backoff_full_jitter_with_floor_and_cap(failures, draw, expected):
    assert backoff_delay(failures, draw, None, S) == pytest.approx(expected)


def test_backoff_honours_retry_after_but_not_beyond_an_hour():
    assert backoff_delay(1, 0.0, 2.0, S) == 2.0
    assert backoff_delay(3, 1.0, 2.0, S) == 4.0  # backoff already longer
    assert backoff_delay(1, 0.0, 900.0, S) == 900.0  # beyond backoff_max: still honoured
    assert backoff_delay(1, 0.0, 10**9, S) == 3600.0


def test_schedule_fetches_at_once_when_empty():
    s = Schedule(S)
    assert s.refresh_due(T0)
    assert s.seconds_until_due(T0) == 0.0
    assert s.next_refresh_wall(T0) == T0.wall


def test_schedule_timer_sleeps_until_due_but_never_beyond_wake_interval():
    s = Schedule(S)
    s.on_success(fetched_token_times(DAY, T0, 0.0, S))
    assert not s.refresh_due(T0)
    assert s.seconds_until_due(T0) == 60.0
    assert s.seconds_until_due(later(T0, 64790)) == 10.0
    assert s.seconds_until_due(later(T0, 70000)) == 0.0
    assert s.refresh_due(later(T0, 64800))
    assert s.next_refresh_wall(T0) == T0.wall + 64800


@pytest.mark.parametrize("lifetime", [DAY, 120.0, 8.0])
def test_schedule_never_refreshes_sooner_than_the_floor_after_a_success(lifetime):
    """A margin as long as the lifetime (refresh_fraction 0.9 plus jitter 0.5, both accepted by
    the config) would make every fresh token due at once: a loop of IMS requests. The timer
    waits min(30 s, half the lifetime) after the fetch whatever the margin says."""
    settings = PolicySettings(refresh_fraction=0.9, refresh_jitter=0.5)
    floor = min(30.0, lifetime / 2)
    schedule = Schedule(settings)
    schedule.on_success(fetched_token_times(lifetime, T0, 1.0, settings))
    assert schedule.token is not None
    assert schedule.token.refresh_due(T0)  # the margin alone says "now"
    assert not schedule.refresh_due(T0)
    assert not schedule.refresh_due(later(T0, floor - 0.5))
    assert schedule.seconds_until_due(T0) == floor
    assert schedule.next_refresh_wall(T0) == T0.wall + floor
    assert schedule.refresh_due(later(T0, floor))
    assert schedule.seconds_until_due(later(T0, floor)) == 0.0


def test_schedule_floor_does_not_delay_an_ordinary_refresh():
    schedule = Schedule(S)
    schedule.on_success(fetched_token_times(DAY, T0, 0.0, S))
    assert not schedule.refresh_due(later(T0, 64799))
    assert schedule.refresh_due(later(T0, 64800))
    assert schedule.seconds_until_due(later(T0, 64790)) == 10.0


def test_schedule_transient_failures_back_off_on_the_boot_clock():
    s = Schedule(S)
    s.on_failure(T0, transient=True, retry_after=None, draw=0.0)
    assert s.failures == 1
    assert s.retry_at == T0.boot + 1.0
    assert not s.may_fetch(later(T0, 0.5))
    assert not s.refresh_due(later(T0, 0.5))
    assert s.seconds_until_due(later(T0, 0.25)) == 0.75
    assert s.refresh_due(later(T0, 1.0))
    s.on_failure(later(T0, 1), transient=True, retry_after=None, draw=1.0)
    assert s.retry_at == T0.boot + 1 + 2.0
    # A wall-clock jump does not shorten a backoff: retries live on the boot clock.
    assert not s.may_fetch(later(T0, 1.5, wall_only=10_000))
    assert s.next_refresh_wall(later(T0, 1)) == T0.wall + 1 + 2.0
    s.on_success(fetched_token_times(DAY, later(T0, 3), 0.0, S))
    assert (s.failures, s.blocked) == (0, False)
    assert s.retry_at is None  # apart: mypy keeps it narrowed to the float asserted above


def test_schedule_honours_retry_after():
    s = Schedule(S)
    s.on_failure(T0, transient=True, retry_after=2.0, draw=0.0)
    assert not s.may_fetch(later(T0, 1.999))
    assert s.may_fetch(later(T0, 2.0))


def test_schedule_permanent_failure_blocks_until_manual():
    s = Schedule(S)
    s.on_success(fetched_token_times(DAY, T0, 0.0, S))
    s.on_failure(later(T0, 70000), transient=False, retry_after=None, draw=0.0)
    assert s.blocked
    assert not s.refresh_due(later(T0, 80000))
    assert not s.may_fetch(later(T0, 80000))
    assert s.next_refresh_wall(T0) is None
    assert s.seconds_until_due(later(T0, 80000)) == 60.0  # still wakes to re-check
    # The old token is still usable while valid:
    assert s.usable(later(T0, 80000), 60)
    assert not s.usable(later(T0, DAY), 0)
    s.on_manual()
    assert s.may_fetch(later(T0, 80000))
    assert s.refresh_due(later(T0, 80000))


def test_schedule_not_refreshable_never_fetches():
    s = Schedule(S, refreshable=False)
    s.on_success(fixed_token_times(DAY, T0.wall + 100, T0))
    assert not s.refresh_due(later(T0, 200))
    assert not s.may_fetch(T0)
    assert s.next_refresh_wall(T0) is None
    assert s.usable(T0, 60)
    assert not s.usable(later(T0, 50), 60)


def test_forced_refresh_at_most_once_a_minute():
    s = Schedule(S)
    assert s.allow_forced(T0)
    assert not s.allow_forced(later(T0, 59.9))
    assert s.allow_forced(later(T0, 60))
    assert not s.allow_forced(later(T0, 61))


def test_on_grid_keeps_real_events_exact():
    now = 100_037.25
    assert on_grid(now, 37.2, 60.0) == now + 37.2
    assert on_grid(now, 59.999, 60.0) == now + 59.999
    assert on_grid(now, 0.0, 60.0) == now
    assert on_grid(now, -5.0, 60.0) == now  # overdue: at once
    assert on_grid(now, 120.0, 0.0) == now + 120.0  # no period, no grid


def test_on_grid_puts_periodic_re_checks_on_the_next_multiple():
    assert on_grid(1000.5, 60.0, 60.0) == 1020.0
    assert on_grid(1020.0, 60.0, 60.0) == 1080.0  # strictly after now
    assert on_grid(1019.999, 60.0, 60.0) == 1020.0  # may be soon; never later than a period
    assert on_grid(1000.5, 3600.0, 60.0) == 1020.0  # a longer delay is re-checked all the same
    # Sleepers that start at different moments of one period wake at the very same float.
    assert {on_grid(t, 60.0, 60.0) for t in (1020.0001, 1033.3, 1079.9999999)} == {1080.0}


def test_on_grid_is_the_next_multiple_for_any_trio_clock_reading():
    import math
    import random

    rng = random.Random(6)
    for _ in range(20_000):
        period = rng.choice([60.0, 5.0, 0.1, 7.3])
        # trio's clock starts at a random offset between 10 000 and 200 000 s
        now = rng.choice([rng.uniform(0.0, 3e5), rng.randrange(10**6) * period])
        deadline = on_grid(now, period, period)
        k = round(deadline / period)
        assert deadline == k * period  # the same float for everyone at this tick
        assert now < deadline <= now + period + 4 * math.ulp(now)  # give or take a rounding
        assert (k - 1) * period <= now  # the first tick after now, not a later one
