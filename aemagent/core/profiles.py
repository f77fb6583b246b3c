"""The profiles: a named credential, its token, its refresh state, and how one is chosen.

The agent (`core.agent`) runs the profiles' tasks; this module holds the data and the rules that
need no task: names, host matching, identity, the state shown by `status`, and the `ProfileTable`
that finds the profile a request is for (by name, by a URL's host, or the default).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

from aemagent.core.clocks import Now
from aemagent.core.policy import Schedule
from aemagent.credentials import Credential, Secret
from aemagent.errors import AemAgentError, AmbiguousError, NotFoundError, UsageError

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
    technical_account_id = None
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
    return (a.kind, a.client_id, a.org_id, a.technical_account_id) == (
        b.kind,
        b.client_id,
        b.org_id,
        b.technical_account_id,
    )


def identity_text(credential: Credential | Unloaded) -> str:
    account = credential.technical_account_id
    return f"client id {credential.client_id}" + (f", account {account}" if account else "")


# Hosts remembered by `ProfileTable`: far more than one user's scripts ask for.
_RESOLVED_MAX = 1024


class ProfileTable:
    """The current profile of each name, and which one a request is for.

    A request names a profile, or gives a URL whose host is matched against the profiles' host
    patterns (those given with --host win over those derived from the credential), or gives
    neither and gets the default profile (or the only one). What a host or no name resolves to
    is remembered until a profile, its hosts or the default change: matching is a scan over
    every profile's patterns, which a script asking for the same host again should not repeat.
    """

    def __init__(self) -> None:
        self._profiles: dict[str, Profile] = {}
        self._resolved: dict[str | None, Profile] = {}  # host (None: no name, no URL) -> profile

    def __len__(self) -> int:
        return len(self._profiles)

    def sorted(self) -> list[Profile]:
        return sorted(self._profiles.values(), key=lambda p: p.name)

    def find(self, name: str) -> Profile | None:
        return self._profiles.get(name)

    def is_current(self, profile: Profile) -> bool:
        """True while `profile` holds its name (it was not forgotten or replaced)."""
        return self._profiles.get(profile.name) is profile

    def put(self, profile: Profile, *, default: bool) -> None:
        """Make `profile` the holder of its name; the caller has dropped the previous one."""
        self._profiles[profile.name] = profile
        self.set_default(profile, default)

    def remove(self, profile: Profile) -> None:
        """Forget `profile` if it still holds its name."""
        if self.is_current(profile):
            del self._profiles[profile.name]
        self._resolved.clear()

    def set_default(self, profile: Profile, default: bool) -> None:
        """Make `profile` the default (or not); also to be called when its hosts changed."""
        if default:
            for other in self._profiles.values():
                other.default = other is profile
        else:
            profile.default = False
        self._resolved.clear()

    def resolve(self, name: str | None = None, url: str | None = None) -> Profile:
        """The profile a request is for; NotFoundError, AmbiguousError or UsageError if none."""
        if name:
            profile = self._profiles.get(name)
            if profile is None:
                raise NotFoundError(self.no_such_profile(name))
            return profile
        if url:
            return self._resolve_url(url)
        found = self._resolved.get(None)
        if found is not None:
            return found
        found = self._resolve_default()
        self._resolved[None] = found
        return found

    def no_such_profile(self, name: str) -> str:
        return f"no profile named {name}; profiles: {self._names_text()}"

    def _resolve_default(self) -> Profile:
        if not self._profiles:
            raise NotFoundError("no profiles loaded; add one with `aemagent add FILE`")
        defaults = [p for p in self._profiles.values() if p.default]
        if defaults:
            return defaults[0]
        if len(self._profiles) == 1:
            return next(iter(self._profiles.values()))
        raise AmbiguousError(
            f"several profiles and none is the default ({', '.join(self._names())});"
            " choose one with --profile, or add one with --default"
        )

    def _resolve_url(self, url: str) -> Profile:
        try:
            host = urlsplit(url if "//" in url else f"//{url}").hostname
        except ValueError:
            host = None
        if not host:
            raise UsageError("url has no host name")
        host = host.lower()
        found = self._resolved.get(host)
        if found is None:
            found = self._match_host(host)
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[host] = found
        return found

    def _match_host(self, host: str) -> Profile:
        # Patterns given with --host win over those derived from the credential: a profile
        # added for one AEM host is not shadowed by a service credential of that environment.
        profiles = self.sorted()
        matches = [p for p in profiles if p.matches_host(host, derived=False)]
        if not matches:
            matches = [p for p in profiles if p.matches_host(host, derived=True)]
        if not matches:
            raise NotFoundError(f"no profile matches host {host}; profiles: {self._names_text()}")
        if len(matches) > 1:
            raise AmbiguousError(
                f"several profiles match host {host}: {', '.join(p.name for p in matches)};"
                " choose one with --profile"
            )
        return matches[0]

    def _names(self) -> list[str]:
        return sorted(self._profiles)

    def _names_text(self) -> str:
        return ", ".join(self._names()) or "none loaded"
