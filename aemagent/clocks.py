"""The two clocks every token decision reads.

`wall` is Unix time: what expiry times are reported in, and the clock that jumps when a laptop
wakes up or NTP corrects it. `boot` counts seconds and keeps counting through suspend (Linux
CLOCK_BOOTTIME); where the OS has no such clock it falls back to the monotonic clock, and the wall
clock still catches a suspend. A token is served only if it is valid on both (CONTRACT.md "Token
lifecycle"). Decisions take a `Now`; only the daemon's edges read a real clock.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Protocol

_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)


class Now(NamedTuple):
    """One reading of both clocks, taken together."""

    wall: float
    boot: float


class Clock(Protocol):
    def now(self) -> Now: ...


class SystemClock:
    """The real clocks."""

    def now(self) -> Now:
        if _BOOTTIME is not None:
            return Now(time.time(), time.clock_gettime(_BOOTTIME))
        return Now(time.time(), time.monotonic())  # pragma: no cover - macOS


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
