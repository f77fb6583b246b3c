"""The two clocks every token decision reads.

`wall` is Unix time: what expiry times are reported in, and the clock that jumps when a laptop
wakes up or NTP corrects it. `boot` counts seconds and keeps counting through suspend: Linux's
CLOCK_BOOTTIME, and on macOS CLOCK_MONOTONIC, which there counts through sleep (macOS has no
CLOCK_BOOTTIME, and Python's `time.monotonic()` there stops while the machine sleeps). Where the
OS has no such clock it falls back to `time.monotonic()`, and the wall clock still catches a
suspend. A token is served only if it is valid on both. Decisions take a `Now`; only the
daemon's edges read a real clock.

`on_grid` is how the daemon's periodic sleepers share their wake-ups (see its docstring).
"""

from __future__ import annotations

import math
import sys
import time
from typing import NamedTuple, Protocol


def boot_clock_id(platform: str | None = None) -> int | None:
    """The clock_gettime(2) clock that counts through suspend here, or None for none."""
    if (platform or sys.platform) == "darwin":
        # Darwin's CLOCK_MONOTONIC is mach_continuous_time: it counts while the machine sleeps.
        return getattr(time, "CLOCK_MONOTONIC", None)
    return getattr(time, "CLOCK_BOOTTIME", None)


class Now(NamedTuple):
    """One reading of both clocks, taken together."""

    wall: float
    boot: float


class Clock(Protocol):
    def now(self) -> Now: ...


class SystemClock:
    """The real clocks; `platform` is there for tests."""

    def __init__(self, platform: str | None = None) -> None:
        self._boot = boot_clock_id(platform)

    def now(self) -> Now:
        if self._boot is not None:
            return Now(time.time(), time.clock_gettime(self._boot))
        return Now(time.time(), time.monotonic())  # pragma: no cover - no such clock


class FakeClock:
    """A clock tests move by hand: `advance` is time passing, `jump_wall` a wall-clock step."""

    def __init__(self, wall: float = 1_800_000_000.0, boot: float = 1000.0) -> None:
        self.wall = wall
        self.boot = boot

    def now(self) -> Now:
        return Now(self.wall, self.boot)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds

    def jump_wall(self, seconds: float) -> None:
        self.wall += seconds


def on_grid(now: float, delay: float, period: float) -> float:
    """The deadline, on the clock `now` was read from, for a sleep of `delay` seconds.

    A delay shorter than `period` is a real event (a refresh due in 37.2 s, a retry backoff, a
    lifetime's end): its deadline is exact, `now + delay` (a negative delay counts as 0). A delay
    of `period` or more is a periodic re-check, whose caller wakes early without harm and decides
    again: its deadline is the first multiple of `period` after `now`, strictly later than `now`
    and never later than `now + period` (give or take a float rounding). The first such sleep may
    be short; from then on they come exactly `period` apart.

    So every periodic sleeper in the process sleeps until the very same floats (`k * period` for
    the same `k`), and trio, which expires every deadline that has passed in one pass of its run
    loop, wakes the process once a period for all of them, not once per sleeper at instants of
    their own. `now` is `trio.current_time()`: the grid is the process's own (trio's clock starts
    at a random offset), which is all the batching needs. A `period` <= 0 means no grid.
    """
    delay = max(delay, 0.0)
    if period <= 0 or delay < period:
        return now + delay
    k = math.floor(now / period) + 1
    # now / period is rounded: the multiples either side of `now` decide, not the quotient.
    while (k - 1) * period > now:
        k -= 1
    while k * period <= now:
        k += 1
    return k * period
