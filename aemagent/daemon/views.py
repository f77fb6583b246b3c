"""The JSON views of the socket API: a profile as `status` shows it, a token as served.

Times are whole unix seconds (rounded down), durations whole seconds; a field that does not apply
(no token yet, no certificate) is null. The token itself appears only in `token_json`.
"""

from __future__ import annotations

import math
from typing import Any

from aemagent.core.clocks import Now
from aemagent.core.logs import fingerprint
from aemagent.core.profiles import Profile, Served, Unloaded


def describe(profile: Profile, now: Now) -> dict[str, Any]:
    """A profile for `status`, `show` and the answers of add and refresh; never its token."""
    times = profile.schedule.token
    credential = profile.credential
    info: dict[str, Any] = {
        "name": profile.name,
        "kind": credential.kind,
        "state": profile.state(now),
        "default": profile.default,
        "hosts": list(profile.hosts + profile.derived_hosts),
        "account": credential.technical_account_id,
        "source": profile.source,
        "client_id": credential.client_id,
        "org_id": credential.org_id,
        "expires_at": None,
        "expires_in": None,
        "refresh_at": _unix(profile.schedule.next_refresh_wall(now)),
        "last_error": (
            credential.error
            if isinstance(credential, Unloaded)
            else str(profile.last_error)
            if profile.last_error
            else None
        ),
        "token_fingerprint": None,
        "certificate_expires_at": _unix(credential.certificate_expires_at),
        "forget_at": _unix(
            None if profile.forget_at is None else now.wall + profile.forget_at - now.boot
        ),
    }
    if times is not None and profile.token is not None:
        remaining = times.remaining(now)
        info["expires_at"] = _unix(now.wall + remaining)
        info["expires_in"] = max(0, math.floor(remaining))
        info["token_fingerprint"] = fingerprint(profile.token.reveal())
    return info


def token_json(served: Served) -> dict[str, Any]:
    """A token handed to a caller, with what it is for."""
    credential = served.profile.credential
    return {
        "access_token": served.token.reveal(),
        "token_type": "Bearer",
        "expires_at": math.floor(served.expires_at),
        "expires_in": math.floor(served.expires_in),
        "profile": served.profile.name,
        "client_id": credential.client_id,
        "org_id": credential.org_id,
        "account": credential.technical_account_id,
    }


def _unix(value: float | None) -> int | None:
    return None if value is None else math.floor(value)
