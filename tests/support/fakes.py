"""Hand-written fakes shared by the unit tests: small classes that behave, not mocks."""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio

from aemagent.core.clocks import Now
from aemagent.core.source import Grant
from aemagent.credentials import Credential, Secret

DAY = 86400.0


class LinkedClock:
    """Wall and boot clocks that follow trio's (mock) clock, plus jumps a test adds."""

    def __init__(self) -> None:
        self.wall_extra = 0.0
        self.boot_extra = 0.0

    def now(self) -> Now:
        t = trio.current_time()
        return Now(1_800_000_000.0 + t + self.wall_extra, 1000.0 + t + self.boot_extra)

    def jump_wall(self, seconds: float) -> None:
        self.wall_extra += seconds

    def suspend(self, seconds: float) -> None:
        """A laptop asleep: wall and boot clocks move on, trio's monotonic clock does not."""
        self.wall_extra += seconds
        self.boot_extra += seconds


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@dataclass(frozen=True, eq=False)
class FakeCredential:
    client_id: str = "cm-p1-e2"
    org_id: str = "ORG@AdobeOrg"
    technical_account_id: str = "TA@techacct.adobe.com"
    digest: str = "digest-1"
    kind = "service"
    refreshable = True
    certificate_expires_at = None

    derived: tuple[str, ...] = ()

    def default_name(self) -> str:
        return "p1-e2"

    def derived_hosts(self) -> tuple[str, ...]:
        return self.derived


class FakeIMS:
    """Answers `fetch` from a script of outcomes; records calls and concurrency."""

    def __init__(self, clock: LinkedClock, lifetime: float = DAY, latency: float = 0.1) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.latency = latency
        self.script: list[Exception | None] = []
        self.calls: list[tuple[float, str]] = []  # (trio time, client id)
        self.gate: trio.Event | None = None
        self.revoked: list[str] = []
        self.active = 0
        self.max_active = 0

    async def revoke(self, credential: Credential, token: Secret) -> str:
        self.revoked.append(token.reveal())
        await trio.sleep(self.latency)
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        return "IMS accepted the revocation (HTTP 200)"

    async def fetch(self, credential: Credential) -> Grant:
        self.calls.append((trio.current_time(), credential.client_id))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            sent = self.clock.now()
            if self.gate is not None:
                await self.gate.wait()
            await trio.sleep(self.latency)
            outcome = self.script.pop(0) if self.script else None
            if outcome is not None:
                raise outcome
            return Grant(
                Secret(f"token-{credential.client_id}-{len(self.calls)}"), self.lifetime, sent
            )
        finally:
            self.active -= 1
