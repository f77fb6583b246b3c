"""What IMS's answers mean: a 200 becomes a Grant, anything else an error of errors.py.

A token's lifetime is its own `expires_in` (ms) when it has one, else the response's, in the unit
of the endpoint that answered (ms from /ims/exchange/jwt, s from /ims/token/v3); it is believed
up to LIFETIME_CAP, never beyond what the token's own `created_at` leaves, and one under
MIN_LIFETIME is an error. Error answers are mapped by status (docs/IMS-WIRE.md, "Errors"), with
IMS's words cleaned, every secret sent redacted from them, and a hint for the user. A JWT
refused for its times is recognised here (`jwt_expired`); the client retries it once on IMS's clock.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import re
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aemagent.core.source import Grant
from aemagent.credentials import Secret, is_loopback_host
from aemagent.errors import ClockSkewError, IMSError, IMSPermanentError, IMSTransientError

if TYPE_CHECKING:
    import httpx

    from aemagent.core.clocks import Now

__all__ = [
    "LIFETIME_CAP",
    "MIN_LIFETIME",
    "MIN_LIFETIME_LOOPBACK",
    "clock_skew_error",
    "error_from_response",
    "grant_from_response",
    "http_date",
    "jwt_expired",
    "parse_retry_after",
    "token_lifetime",
]

log = logging.getLogger(__name__)

# A lifetime longer than this is garbage, not a token (IMS's are 24 h).
_MAX_LIFETIME = 366 * 86400.0
# IMS documents 24 h access tokens: a longer lifetime (up to _MAX_LIFETIME) is believed only this
# far, with a warning, so a wrong unit or a lying answer cannot keep a token for weeks.
LIFETIME_CAP = 25 * 3600.0
# A token living less than this is no token: refreshing it would mean several IMS requests a
# second. It is an IMS error (transient: retried with backoff). Loopback IMS bases (the emulator,
# whose short tokens exercise refreshing) may go lower.
MIN_LIFETIME = 60.0
MIN_LIFETIME_LOOPBACK = 5.0
_UNUSABLE = "IMS answered 200 without a usable token"


# --- lifetimes ------------------------------------------------------------------------------------


def grant_from_response(
    response: httpx.Response, sent: Now, *, unit_ms: bool, ims_base: str
) -> Grant:
    """The Grant in a successful answer; IMSTransientError when it holds no usable token.

    `unit_ms` is the unit of the response's `expires_in`; `sent` is when the request went out.
    """
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        body = {}
    token = body.get("access_token")
    # A token goes into an Authorization header: printable ASCII without spaces, or it is garbage.
    if not isinstance(token, str) or not re.fullmatch(r"[\x21-\x7e]+", token):
        raise IMSTransientError(_UNUSABLE, http_status=response.status_code)
    said = token_lifetime(token, body.get("expires_in"), unit_ms=unit_ms)
    lifetime = min(said, LIFETIME_CAP)
    if said > lifetime:
        log.warning(
            "IMS says a token lives %.0f s; believing at most %.0f s (IMS's tokens live 24 h)",
            said,
            LIFETIME_CAP,
        )
    left = _left_by_created_at(token, said, response, sent)
    if left is not None and left < lifetime:
        log.warning(
            "IMS answered with a token whose created_at is %.0f s old; it has %.0f s left",
            said - left,
            left,
        )
        lifetime = left
    loopback = is_loopback_host(urlsplit(ims_base).hostname or "")
    floor = MIN_LIFETIME_LOOPBACK if loopback else MIN_LIFETIME
    if lifetime <= 0:
        raise IMSTransientError(
            "IMS answered with a token that has expired already (by its created_at)",
            http_status=response.status_code,
        )
    if lifetime < floor:
        raise IMSTransientError(
            f"IMS answered with a token valid for only {lifetime:.3g} s, less than {floor:g} s",
            http_status=response.status_code,
        )
    return Grant(access_token=Secret(token), lifetime=lifetime, sent=sent)


def token_lifetime(access_token: str, response_expires_in: object, *, unit_ms: bool) -> float:
    """Seconds the token lives: its own `expires_in` (ms), else the response's in `unit_ms`.

    Either value is skipped when it is missing, not a number, not positive or above a year.
    Neither usable -> IMSTransientError: a garbled 200 (a proxy, a glitch) may well be fine later.
    Not capped here: `grant_from_response` caps at LIFETIME_CAP and at what the token's
    `created_at` leaves.
    """
    own = _seconds(_token_payload(access_token).get("expires_in"), unit_ms=True)
    if own is not None:
        return own
    answered = _seconds(response_expires_in, unit_ms=unit_ms)
    if answered is not None:
        return answered
    raise IMSTransientError(_UNUSABLE)


def _token_payload(token: str) -> dict[str, Any]:
    """The middle segment of a JWT-shaped token, unverified (IMS tokens cannot be verified)."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeDecodeError are ValueErrors
        return {}
    return payload if isinstance(payload, dict) else {}


def _seconds(value: object, *, unit_ms: bool) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    seconds = number / 1000 if unit_ms else number
    return seconds if 0 < seconds <= _MAX_LIFETIME else None  # NaN fails too


def _left_by_created_at(
    token: str, lifetime: float, response: httpx.Response, sent: Now
) -> float | None:
    """Seconds the token has left by its own `created_at` (ms) plus `lifetime`, or None.

    Its age is read on IMS's clock (the answer's Date; our send time without one), so a clock
    here that is off does not make a fresh token look old, nor an old one fresh.
    """
    value = _token_payload(token).get("created_at")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        created = float(value) / 1000
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(created):
        return None
    ims_now = http_date(response.headers.get("date")) or sent.wall
    # Date has whole seconds: an age under a second is noise, and a negative one says nothing.
    age = ims_now - created
    return lifetime - age if age > 1.0 else None


# --- dates ----------------------------------------------------------------------------------------


def http_date(value: str | None) -> float | None:
    """An HTTP date header (IMS's `Date`) as a Unix time, or None when missing or unreadable."""
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
        # "-0000" gives a naive datetime, which is UTC, not local time.
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def parse_retry_after(value: str | None, *, now_wall: float) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds, or an HTTP date compared to `now_wall`."""
    if not value:
        return None
    if re.fullmatch(r"\s*\d+\s*", value, re.ASCII):
        return float(value)
    when = http_date(value)
    return None if when is None else max(0.0, when - now_wall)


# --- errors ---------------------------------------------------------------------------------------


def error_from_response(
    response: httpx.Response,
    *,
    now_wall: float,
    redact: tuple[str, ...] = (),
    kind: str = "service",
    revoking: bool = False,
) -> IMSError:
    """Map an unsuccessful IMS answer to the error tree (docs/IMS-WIRE.md, "Errors").

    `kind` (the credential's) and `revoking` choose the words of the summary and the hint.
    """
    status = response.status_code
    try:
        body = json.loads(response.content)
    except (ValueError, RecursionError):
        body = None
    error = description = None
    if isinstance(body, dict):
        code = _redacted(body.get("error"), redact)
        # IMS's error codes are identifiers (invalid_client); anything else is not shown.
        if isinstance(code, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", code):
            error = code
        description = body.get("error_description")
    # IMS never echoes what it was sent, but whatever sits in between might (best effort): every
    # piece of the answer that reaches a message is redacted, the error code and the debug id
    # too (a client secret is a perfectly good identifier).
    description = _clean(_redacted(description, redact), 300)
    debug_id = _clean(_redacted(response.headers.get("x-debug-id"), redact), 100)
    if status in (408, 429) or status >= 500:
        ims_now = http_date(response.headers.get("date"))
        retry_after = parse_retry_after(
            response.headers.get("retry-after"), now_wall=ims_now or now_wall
        )
        what = "IMS is unavailable"
        if status == 429:
            what = "IMS is throttling requests" if revoking else "IMS is throttling token requests"
        return IMSTransientError(
            f"{what} (HTTP {status})",
            http_status=status,
            error=error,
            description=description,
            debug_id=debug_id,
            retry_after=retry_after,
        )
    if 400 <= status < 500:
        refused = "the revocation" if revoking else "the credential"
        return IMSPermanentError(
            f"IMS refused {refused} (HTTP {status})",
            http_status=status,
            error=error,
            description=description,
            debug_id=debug_id,
            hint=_hint(error, description, kind=kind, revoking=revoking),
        )
    return IMSTransientError(
        f"IMS answered with an unexpected HTTP {status}",
        http_status=status,
        error=error,
        description=description,
        debug_id=debug_id,
    )


def _clean(value: object, limit: int) -> str | None:
    """IMS's words for a message: one short printable line, or None."""
    if not isinstance(value, str):
        return None
    text = "".join(c if c.isprintable() else " " for c in value).strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or None


def _redacted(value: object, secrets: tuple[str, ...]) -> object:
    """`value` with every secret in `secrets` replaced by <redacted> (non-strings as they are).

    A secret is found in any percent-encoding too: each of its characters raw or as %XX of its
    UTF-8 bytes, in any case, a space also as `+` (what a form encoder, a proxy or a log
    formatter in between may have made of it).
    """
    if isinstance(value, str):
        for secret in filter(None, secrets):
            value = _secret_pattern(secret).sub("<redacted>", value)
    return value


@functools.lru_cache(maxsize=64)
def _secret_pattern(secret: str) -> re.Pattern[str]:
    # Case-blind: hex digits come in either case, and a secret with its letters case-folded by
    # something in between is still the secret.
    return re.compile("".join(_char_pattern(char) for char in secret), re.IGNORECASE)


def _char_pattern(char: str) -> str:
    escapes = "".join(f"%{b:02X}" for b in char.encode())
    ways = [re.escape(char), escapes] + (["\\+"] if char == " " else [])
    return f"(?:{'|'.join(ways)})"


def _hint(error: str | None, description: str | None, *, kind: str, revoking: bool) -> str | None:
    said = (description or "").lower()
    if error == "invalid_client":
        where = "Adobe" if kind == "oauth" else "AEM"
        return (
            "check client id and secret; "
            f"the credential may have been deleted in the {where} Developer Console"
        )
    if revoking:
        if error == "invalid_token":
            return "the token may have expired or been revoked already"
        return None
    if kind == "oauth":
        if error == "invalid_scope":
            return (
                "the scopes are not all granted to this OAuth client; "
                "compare them with its credential in the Adobe Developer Console"
            )
        return None
    if error == "invalid_token" and (
        "expire" in said or ("exp" in said and ("ahead" in said or "future" in said))
    ):
        return "clock skew? check this machine's clock"
    if error == "invalid_signature" or (
        error == "invalid_token" and ("signature" in said or "binding" in said)
    ):
        return "the certificate may have been revoked in the AEM Developer Console"
    if error == "invalid_scope":
        return "the metascopes do not match the integration"
    return None


# --- clock skew -----------------------------------------------------------------------------------


def jwt_expired(error: IMSError) -> bool:
    """IMS refused the JWT's times: `exp` in its past, or too far in its future (the clock here
    is more than a day ahead: the emulator says "JWT exp claim is more than 24 hours ahead")."""
    said = (error.description or "").lower()
    return error.error == "invalid_token" and (
        "expire" in said or ("exp" in said and ("ahead" in said or "future" in said))
    )


def clock_skew_error(error: IMSError, advice: str) -> ClockSkewError:
    """`error` (a JWT refused for its times) restated as clock skew, with `advice` in the hint."""
    said = "expired" if "expire" in (error.description or "").lower() else "is from the future"
    return ClockSkewError(
        f"IMS says the JWT {said} (HTTP {error.http_status})",
        http_status=error.http_status,
        error=error.error,
        description=error.description,
        debug_id=error.debug_id,
        hint=f"clock skew: {advice}",
    )
