"""Local development tokens: an access token that is its own credential (docs/IMS-WIRE.md).

The AEM Developer Console hands out `{"accessToken": "..."}` (sometimes with `"ok": true,
"statusCode": 200` around it); users also paste the bare token. The token is JWT-shaped; its
payload carries `created_at` and `expires_in` as strings of milliseconds, which give its expiry on
IMS's clock (there is no request to time). Nothing else can be verified: IMS's signature is not
checkable here. A token whose payload does not read as an IMS access token is refused, without
ever quoting it. An expired token parses: whether to refuse it is the agent's call.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from aemagent.core.logs import utc_iso
from aemagent.credentials.fields import Secret, canonical_digest, describe, text_value
from aemagent.errors import CredentialError

__all__ = ["DevToken", "looks_like_token", "parse_dev_token", "parse_dev_token_json"]

# Three base64url parts, as IMS's access tokens are; an optional "Bearer " is forgiven.
_JWT_SHAPE = re.compile(r"(?i:bearer\s+)?([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)")
# Plausibility bounds, in ms: created between 2000 and 2100, living at most a year (IMS: 24 h).
_CREATED_MIN_MS = 946_684_800_000
_CREATED_MAX_MS = 4_102_444_800_000
_LIFETIME_MAX_MS = 366 * 86_400_000
_MS_TEXT = re.compile(r"[0-9]{1,20}(\.[0-9]{1,9})?")
_ID_TEXT = re.compile(r"[\x21-\x7e]{1,200}")


@dataclass(frozen=True, repr=False, eq=False)
class DevToken:
    """A local development token: served as is until it expires, never refreshed or revoked."""

    kind: ClassVar[str] = "devtoken"
    refreshable: ClassVar[bool] = False  # no secret, no refresh token: download a new one
    org_id: ClassVar[str | None] = None
    technical_account_id: ClassVar[str | None] = None
    technical_account_email: ClassVar[str | None] = None
    certificate_expires_at: ClassVar[float | None] = None
    token: Secret
    created_at: float  # unix seconds, on IMS's clock
    expires_at: float  # created_at + lifetime
    lifetime: float  # seconds: the token's expires_in
    client_id: str  # the payload's, e.g. "dev-console-prod"
    user_id: str | None
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            fields = {"kind": self.kind, "token": self.token.reveal()}
            object.__setattr__(self, "digest", canonical_digest(fields))

    def __repr__(self) -> str:
        return (
            f"DevToken(client_id={self.client_id!r}, user_id={self.user_id!r}, "
            f"expires_at={utc_iso(self.expires_at)})"
        )

    def default_name(self) -> str:
        return "devtoken"

    def derived_hosts(self) -> tuple[str, ...]:
        # The token works for one environment, but nothing in it says which.
        return ()

    def expired(self, now_wall: float) -> bool:
        """True once `now_wall` (unix seconds) reaches the expiry IMS stamped into the token."""
        return now_wall >= self.expires_at


def looks_like_token(text: str) -> bool:
    """True for a JWT-shaped string (optionally after "Bearer "): the bare-token form."""
    return _JWT_SHAPE.fullmatch(text.strip()) is not None


def parse_dev_token_json(obj: Mapping[Any, Any]) -> DevToken:
    """The AEM Developer Console's file: an object with `accessToken`."""
    value = text_value(obj.get("accessToken"), "accessToken", secret=True)
    return parse_dev_token(value, field="accessToken")


def parse_dev_token(text: str, *, field: str | None = None) -> DevToken:
    """A bare token; complaints start with `field` (or "credential") and never quote the token."""
    try:
        return _read_token(text)
    except _NotAToken as exc:
        where = field or "credential"
        raise CredentialError(f"{where} is not an IMS access token: {exc}", field=field) from None


class _NotAToken(Exception):
    """Why a string is not an IMS access token; never holds any of the string."""


def _read_token(text: str) -> DevToken:
    match = _JWT_SHAPE.fullmatch(text.strip())
    if match is None:
        what = describe(text, secret=True)
        raise _NotAToken(f"expected three base64url parts separated by dots, got {what}")
    token = match.group(1)
    claims = _payload(token.split(".")[1])
    if claims is None:
        raise _NotAToken("its payload is not base64url-encoded JSON")
    kind = claims.get("type")
    if kind is not None and kind != "access_token":
        raise _NotAToken(f"its type is {describe(kind)}, not access_token")
    created_ms = _milliseconds(claims, "created_at")
    if not _CREATED_MIN_MS <= created_ms <= _CREATED_MAX_MS:
        what = describe(claims["created_at"])
        raise _NotAToken(f"its created_at is not a plausible time in ms ({what})")
    lifetime_ms = _milliseconds(claims, "expires_in")
    if not 0 < lifetime_ms <= _LIFETIME_MAX_MS:
        what = describe(claims["expires_in"])
        raise _NotAToken(f"its expires_in is not a lifetime in ms of up to a year ({what})")
    client_id = claims.get("client_id")
    if client_id is None:
        raise _NotAToken("its payload has no client_id")
    if not isinstance(client_id, str) or not _ID_TEXT.fullmatch(client_id):
        raise _NotAToken(f"its client_id is malformed ({describe(client_id)})")
    user_id = claims.get("user_id")
    if not isinstance(user_id, str) or not _ID_TEXT.fullmatch(user_id):
        user_id = None
    created_at = created_ms / 1000
    lifetime = lifetime_ms / 1000
    return DevToken(
        token=Secret(token),
        created_at=created_at,
        expires_at=created_at + lifetime,
        lifetime=lifetime,
        client_id=client_id,
        user_id=user_id,
    )


def _payload(segment: str) -> dict[str, Any] | None:
    try:
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None
    return payload if isinstance(payload, dict) else None


def _milliseconds(claims: Mapping[str, Any], name: str) -> float:
    """A claim holding a number of ms: a string of digits as IMS writes it, or a JSON number."""
    value = claims.get(name)
    if value is None:
        raise _NotAToken(f"its payload has no {name}")
    text = isinstance(value, str) and _MS_TEXT.fullmatch(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e20
    if not (text or number) or not math.isfinite(float(value)):
        raise _NotAToken(f"its {name} is not a number of ms ({describe(value)})")
    return float(value)
