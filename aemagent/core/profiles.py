"""One profile: a named credential, its token, its refresh state, and how it is chosen.

The agent (agent.py) owns the profiles and runs their tasks; this module holds the data and the
small rules that need no task: names, host matching, the state shown by `status`, identity.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import trio

from aemagent.core.clocks import Now
from aemagent.core.policy import Schedule
from aemagent.credentials import Credential, Secret
from aemagent.errors import AemAgentError, UsageError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def check_profile_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "…"
        raise UsageError(
            f"invalid profile name {shown!r}: use letters, digits, '.', '_', '@' or '-',"
            " at most 64 characters"
        )
    return name


@dataclass(frozen=True, eq=False)
class Unloaded:
    """Stands in for the credential of a config-file profile that could not be read (yet)."""

    error: str
    kind = "unloaded"
    refreshable = False
    client_id = None
    org_id = None
    digest = ""
    certificate_expires_at = None

    def derived_hosts(self) -> tuple[str, ...]:
        return ()

    def __str__(self) -> str:
        return f"unloaded credential ({self.error})"


@dataclass(eq=False)
class Flight:
    """One IMS call in progress for one profile."""

    done: trio.Event = field(default_factory=trio.Event)
    error: AemAgentError | None = None


@dataclass(frozen=True)
class Served:
    """A token handed to a caller."""

    profile: Profile
    token: Secret
    expires_at: float  # wall clock, unix seconds
    expires_in: float


@dataclass(eq=False)
class Profile:
    name: str
    credential: Credential | Unloaded
    generation: int
    schedule: Schedule
    hosts: tuple[str, ...] = ()
    default: bool = False
    source: str = "added"
    forget_at: float | None = None  # boot clock; `add --lifetime`
    token: Secret | None = None
    fetches: int = 0
    last_error: AemAgentError | None = None
    flight: Flight | None = None
    # A manual refresh asked for a new token and has not got one yet: after a transient failure
    # the timer retries (with backoff) even while the current token is not yet due.
    refresh_wanted: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    published: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None

    def notify(self) -> None:
        event, self.changed = self.changed, trio.Event()
        event.set()

    def state(self, now: Now) -> str:
        times = self.schedule.token
        if isinstance(self.credential, Unloaded):
            return "unloaded"
        if self.flight is not None:
            return "refreshing"
        if self.schedule.blocked:
            return "failed"
        if self.schedule.retry_at is not None:
            return "retrying"
        if times is None:
            return "pending"
        return "valid" if times.remaining(now) > 0 else "expired"

    @property
    def derived_hosts(self) -> tuple[str, ...]:
        return tuple(h for h in self.credential.derived_hosts() if h not in self.hosts)

    def matches_host(self, host: str, *, derived: bool) -> bool:
        patterns = self.derived_hosts if derived else self.hosts
        return any(fnmatch.fnmatchcase(host, pattern) for pattern in patterns)


def same_identity(a: Credential | Unloaded, b: Credential) -> bool:
    return (a.kind, a.client_id, a.org_id, account_of(a)) == (
        b.kind,
        b.client_id,
        b.org_id,
        account_of(b),
    )


def account_of(credential: Credential | Unloaded) -> str | None:
    return getattr(credential, "technical_account_id", None)


def identity_text(credential: Credential | Unloaded) -> str:
    account = account_of(credential)
    return f"client id {credential.client_id}" + (f", account {account}" if account else "")
