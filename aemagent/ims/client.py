"""The IMS client: exchanges a credential for an access token (IMS.md 2-7), and revokes tokens.

One `fetch` is one exchange. Service credentials sign a fresh JWT and POST it to
/ims/exchange/jwt (`expires_in` in ms); OAuth server-to-server credentials POST their client id,
secret and scopes to /ims/token/v3 (`expires_in` in s); either way the token's own `expires_in`
(ms) wins when it has one. A development token cannot be fetched again. Errors come out of the tree
in errors.py: transient ones (5xx, 429, timeouts, unreachable IMS, an unusable 200) are for the
caller to retry with backoff; permanent ones (4xx) mean the credential is wrong. The one retry made
here is the clock-skew retry of the JWT exchange: IMS says the JWT expired (or that its `exp` is
more than a day ahead), so its `exp` is computed again from IMS's `Date` header. Every attempt
builds its body afresh. No message, log line or exception text ever carries the client secret,
the JWT or the token, in any percent-encoding.

IMS is not trusted further than it must be: answers are asked for uncompressed and refused
compressed (never inflated), capped at 256 KiB as they arrive; a lifetime is believed up to
25 h, never beyond what the token's own `created_at` leaves, and one under a minute is an error.

`revoke` asks IMS to invalidate an access token (IMS.md 6). Whether production IMS honours that
for server-to-server tokens is not documented, so its answer is reported, not interpreted.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import math
import re
import ssl
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Self, assert_never, cast
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
import trio

from aemagent import __version__
from aemagent.core.logs import utc_iso
from aemagent.core.source import Grant
from aemagent.credentials import (
    Credential,
    DevToken,
    OAuthCredential,
    Secret,
    ServiceCredential,
    is_loopback_host,
)
from aemagent.errors import (
    ClockSkewError,
    ConfigError,
    IMSError,
    IMSPermanentError,
    IMSTransientError,
    UsageError,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from aemagent.core.clocks import Clock, Now

__all__ = [
    "Grant",
    "IMSClient",
    "build_jwt_claims",
    "error_from_response",
    "parse_retry_after",
    "token_lifetime",
]

log = logging.getLogger(__name__)

_USER_AGENT = f"aemagent/{__version__}"
_FORM = "application/x-www-form-urlencoded"
# IMS answers are a few KiB; a proxy or a broken endpoint must not make the daemon buffer more.
MAX_ANSWER = 256 * 1024
_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})
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
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_NO_REFRESH = (
    "a development token cannot be refreshed; download a new one from the AEM Developer Console"
)


# --- pure pieces ----------------------------------------------------------------------------------


def build_jwt_claims(cred: ServiceCredential, *, now_wall: float, lifetime: int) -> dict[str, Any]:
    """The JWT claims of IMS.md 2: integer `exp`/`iat`, and one `true` claim per metascope."""
    iat = int(now_wall)
    claims: dict[str, Any] = {
        "exp": iat + lifetime,
        "iat": iat,
        "iss": cred.org_id,
        "sub": cred.technical_account_id,
        "aud": f"{cred.ims_base}/c/{cred.client_id}",
    }
    for scope in cred.metascopes:
        claims[f"{cred.ims_base}/s/{scope}"] = True
    return claims


def token_lifetime(access_token: str, response_expires_in: object, *, unit_ms: bool) -> float:
    """Seconds the token lives: its own `expires_in` (ms), else the response's in `unit_ms`.

    Either value is skipped when it is missing, not a number, not positive or above a year.
    Neither usable -> IMSTransientError: a garbled 200 (a proxy, a glitch) may well be fine later.
    Not capped here: `_grant` caps at LIFETIME_CAP and at what the token's `created_at` leaves.
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


def _http_date(value: str | None) -> float | None:
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
    when = _http_date(value)
    return None if when is None else max(0.0, when - now_wall)


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


def error_from_response(
    response: httpx.Response,
    *,
    now_wall: float,
    redact: tuple[str, ...] = (),
    kind: str = "service",
    revoking: bool = False,
) -> IMSError:
    """Map an unsuccessful IMS answer to the error tree (IMS.md 5).

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
        ims_now = _http_date(response.headers.get("date"))
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


def _jwt_expired(error: IMSError) -> bool:
    """IMS refused the JWT's times: `exp` in its past, or too far in its future (the clock here
    is more than a day ahead: the emulator says "JWT exp claim is more than 24 hours ahead")."""
    said = (error.description or "").lower()
    return error.error == "invalid_token" and (
        "expire" in said or ("exp" in said and ("ahead" in said or "future" in said))
    )


# --- the client -----------------------------------------------------------------------------------


class IMSClient:
    """Fetches access tokens from IMS. One httpx client per kind of destination, made lazily.

    Loopback IMS bases (the emulator) get a client that ignores the environment, so HTTP_PROXY
    and ALL_PROXY never see loopback traffic. Others honour HTTPS_PROXY, NO_PROXY, SSL_CERT_FILE
    and SSL_CERT_DIR (httpx does with trust_env=True); explicit `proxy`/`ca_file` win over them.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 20.0,
        jwt_lifetime: int = 300,
        proxy: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        if proxy is not None and urlsplit(proxy).scheme.lower() not in _PROXY_SCHEMES:
            raise ConfigError(f"proxy must be an http://, https:// or socks5:// URL: {proxy!r}")
        self._clock = clock
        self._transport = transport
        self._timeout = timeout
        self._jwt_lifetime = jwt_lifetime
        self._proxy = proxy
        self._ca_file = ca_file
        self._clients: dict[str, httpx.AsyncClient] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def fetch(self, credential: Credential) -> Grant:
        """A new access token; raises IMSTransientError or IMSPermanentError."""
        if isinstance(credential, ServiceCredential):
            return await self._exchange_jwt(credential)
        if isinstance(credential, OAuthCredential):
            return await self._client_credentials(credential)
        if isinstance(credential, DevToken):
            raise IMSPermanentError(_NO_REFRESH)
        assert_never(credential)

    async def revoke(self, credential: Credential, token: Secret) -> str:
        """Ask IMS to invalidate `token` (IMS.md 6); what IMS answered, in a few words.

        Best effort: IMS does not document whether it honours this for server-to-server tokens,
        and a 200 says only that it took the request. Raises the IMSError subclasses, with IMS's
        words; a development token raises UsageError (the agent holds nothing to revoke it with).
        """
        if isinstance(credential, DevToken):
            raise UsageError(
                "a development token cannot be revoked by the agent; it expires at "
                f"{utc_iso(credential.expires_at)}"
            )
        secret, value = credential.client_secret.reveal(), token.reveal()
        form = {
            "token_type": "access_token",
            "token": value,
            "cascading": "all",
            "client_id": credential.client_id,
            "client_secret": secret,
        }
        url = f"{credential.ims_base}/ims/invalidate_token/v2"
        client = self._client_for(credential.ims_base)
        response = await self._post(
            client,
            url,
            urlencode(form).encode("ascii"),
            headers={"X-IMS-ClientId": credential.client_id},  # as Adobe's ims-go sends
        )
        if response.is_success:
            return f"IMS accepted the revocation (HTTP {response.status_code})"
        raise error_from_response(
            response,
            now_wall=self._clock.now().wall,
            redact=(secret, value),
            kind=credential.kind,
            revoking=True,
        )

    async def _client_credentials(self, cred: OAuthCredential) -> Grant:
        """OAuth server-to-server (IMS.md 3): no JWT, so no clock-skew retry either."""
        secret = cred.client_secret.reveal()
        form = {
            "grant_type": "client_credentials",
            "client_id": cred.client_id,
            "client_secret": secret,
            "scope": ",".join(cred.scopes),
        }
        client = self._client_for(cred.ims_base)
        sent = self._clock.now()
        response = await self._post(
            client, f"{cred.ims_base}/ims/token/v3", urlencode(form).encode("ascii")
        )
        if response.is_success:
            return _grant(response, sent, unit_ms=False, ims_base=cred.ims_base)  # seconds here
        raise error_from_response(
            response,
            now_wall=self._clock.now().wall,
            redact=(secret,),
            kind=cred.kind,
        )

    async def _exchange_jwt(self, cred: ServiceCredential) -> Grant:
        url = f"{cred.ims_base}/ims/exchange/jwt"
        response, sent, redact = await self._post_jwt(url, cred, self._clock.now().wall)
        if response.is_success:
            return _grant(response, sent, unit_ms=True, ims_base=cred.ims_base)
        error = error_from_response(response, now_wall=self._clock.now().wall, redact=redact)
        if not _jwt_expired(error):
            raise error
        ims_now = _http_date(response.headers.get("date"))
        if ims_now is None:
            raise _clock_skew(error, "check this machine's clock (IMS sent no Date to compare)")
        skew = self._clock.now().wall - ims_now
        log.warning(
            "IMS refused the times of the JWT for %s; retrying once on IMS's clock (%+.0f s off)",
            cred.client_id,
            skew,
        )
        response, sent, redact = await self._post_jwt(url, cred, self._clock.now().wall - skew)
        if response.is_success:
            return _grant(response, sent, unit_ms=True, ims_base=cred.ims_base)
        error = error_from_response(response, now_wall=self._clock.now().wall, redact=redact)
        if _jwt_expired(error):
            raise _clock_skew(
                error, f"this machine's clock differs from IMS's by {abs(skew):.0f} s"
            )
        raise error

    async def _post_jwt(
        self, url: str, cred: ServiceCredential, issued_at: float
    ) -> tuple[httpx.Response, Now, tuple[str, ...]]:
        """One attempt, with a JWT and body built for it (a retried body must never be reused)."""
        claims = build_jwt_claims(cred, now_wall=issued_at, lifetime=self._jwt_lifetime)
        assertion = jwt.encode(claims, cred.private_key, algorithm="RS256")
        secret = cred.client_secret.reveal()
        form = {"client_id": cred.client_id, "client_secret": secret, "jwt_token": assertion}
        client = self._client_for(cred.ims_base)
        sent = self._clock.now()
        response = await self._post(client, url, urlencode(form).encode("ascii"))
        return response, sent, (secret, assertion)

    async def _post(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        where = urlsplit(url).netloc
        try:
            with trio.fail_after(self._timeout):
                request = client.build_request(
                    "POST", url, content=body, headers={"Content-Type": _FORM, **(headers or {})}
                )
                response = await client.send(request, stream=True)
                try:
                    _refuse_encoded(response, where)
                    content = await _read_capped(response, where)
                finally:
                    await response.aclose()
        except (trio.TooSlowError, httpx.TimeoutException) as exc:
            raise IMSTransientError(
                f"IMS at {where} did not answer within {self._timeout:g} s"
            ) from exc
        # httpx's messages name the failure (refused, DNS, TLS), never the request body.
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            said = " ".join(str(exc).split())[:200] or type(exc).__name__
            hint = None
            if "CERTIFICATE_VERIFY_FAILED" in said:
                hint = "behind a TLS-inspecting proxy? point SSL_CERT_FILE or ca_file at its CA"
            elif said.startswith("407"):
                hint = "the proxy wants a login: put user and password in the proxy URL"
            raise IMSTransientError(f"could not reach IMS at {where}: {said}", hint=hint) from exc
        # Never compressed (refused above); the copy's length is the content's own.
        kept = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in _FRAMING]
        return httpx.Response(response.status_code, headers=kept, content=content, request=request)

    def _client_for(self, ims_base: str) -> httpx.AsyncClient:
        parts = urlsplit(ims_base)
        loopback = is_loopback_host(parts.hostname or "")
        # credentials.py refuses these already; a hand-built credential must not slip through.
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise IMSPermanentError(
                f"refusing to send credentials to {ims_base}: only https:// or loopback http://"
            )
        kind = "injected" if self._transport else "loopback" if loopback else "remote"
        client = self._clients.get(kind)
        if client is None:
            try:
                options = self.client_options(loopback=loopback)
                client = httpx.AsyncClient(
                    transport=self._transport,
                    timeout=self._timeout,
                    # Identity: an answer compressed many times over (a few KiB that inflate to
                    # gigabytes) must never reach a decompressor. `_refuse_encoded` checks.
                    headers={
                        "User-Agent": _USER_AGENT,
                        "Accept": "application/json",
                        "Accept-Encoding": "identity",
                    },
                    follow_redirects=False,  # a redirect must not carry the secret elsewhere
                    **options,
                )
            except OSError as exc:  # an unreadable CA file (ssl.SSLError is an OSError)
                where = self._ca_file or "SSL_CERT_FILE/SSL_CERT_DIR"
                raise IMSTransientError(f"cannot load CA certificates from {where}: {exc}") from exc
            self._clients[kind] = client
        return client

    def client_options(self, *, loopback: bool) -> dict[str, Any]:
        """httpx.AsyncClient options for loopback or remote IMS bases (the proxy/CA decision)."""
        verify: ssl.SSLContext | bool = True
        if self._ca_file is not None:
            verify = ssl.create_default_context(cafile=self._ca_file)
        if loopback:
            return {"trust_env": False, "proxy": None, "verify": verify}
        return {"trust_env": True, "proxy": self._proxy, "verify": verify}


def _refuse_encoded(response: httpx.Response, where: str) -> None:
    """Refuse a compressed answer (identity was asked for) before reading a byte of it.

    Refused rather than inflated with a bound: IMS answers are a few KiB of JSON and IMS honours
    `Accept-Encoding: identity`, so a Content-Encoding means a broken or hostile hop; and
    refusing keeps every decompressor (gzip, deflate, br, zstd, stacked) out of the daemon.
    Transient: a proxy's glitch may pass.
    """
    encodings = [
        e.strip().lower()
        for value in response.headers.get_list("content-encoding")
        for e in value.split(",")
    ]
    encodings = [e for e in encodings if e and e != "identity"]
    if encodings:
        shown = ", ".join(encodings)
        if not re.fullmatch(r"[a-z0-9, -]{1,60}", shown):
            shown = "an unknown coding"
        raise IMSTransientError(
            f"IMS at {where} answered with Content-Encoding {shown} although identity was asked",
            http_status=response.status_code,
        )


async def _read_capped(response: httpx.Response, where: str) -> bytes:
    """The body as sent (never decompressed), refused beyond MAX_ANSWER: IMS answers are a few
    KiB, and the cap counts the bytes that arrive."""
    if response.is_stream_consumed:  # an in-memory answer (httpx.MockTransport): no stream
        chunks_of = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
    else:
        chunks_of = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
    chunks, size = [], 0
    # Either is an async generator (typed as an iterator): close it even when we stop.
    async with contextlib.aclosing(chunks_of) as body:
        async for chunk in body:
            size += len(chunk)
            if size > MAX_ANSWER:
                raise IMSTransientError(
                    f"IMS at {where} answered with more than {MAX_ANSWER} bytes"
                )
            chunks.append(chunk)
    return b"".join(chunks)


def _grant(response: httpx.Response, sent: Now, *, unit_ms: bool, ims_base: str) -> Grant:
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
    ims_now = _http_date(response.headers.get("date")) or sent.wall
    # Date has whole seconds: an age under a second is noise, and a negative one says nothing.
    age = ims_now - created
    return lifetime - age if age > 1.0 else None


def _clock_skew(error: IMSError, advice: str) -> ClockSkewError:
    said = "expired" if "expire" in (error.description or "").lower() else "is from the future"
    return ClockSkewError(
        f"IMS says the JWT {said} (HTTP {error.http_status})",
        http_status=error.http_status,
        error=error.error,
        description=error.description,
        debug_id=error.debug_id,
        hint=f"clock skew: {advice}",
    )
