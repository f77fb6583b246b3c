"""The IMS client: exchanges a credential for an access token, and revokes tokens.

One `fetch` is one exchange (docs/IMS-WIRE.md). Service credentials sign a fresh JWT and POST it to
/ims/exchange/jwt; OAuth server-to-server credentials POST their client id, secret and scopes to
/ims/token/v3; what the answer means (the lifetime and its units, the errors) is answers.py's
business, the JWT assertion.py's. Errors come out of the tree in errors.py: transient ones (5xx,
429, timeouts, unreachable IMS, an unusable 200) are for the caller to retry with backoff;
permanent ones (4xx) mean the credential is wrong. The one retry made here is the clock-skew
retry of the JWT exchange: IMS says the JWT expired (or that its `exp` is more than a day ahead),
so its `exp` is computed again from IMS's `Date` header. Every attempt builds its body afresh.
No message, log line or exception text ever carries the client secret, the JWT or the token, in
any percent-encoding.

IMS is not trusted further than it must be: answers are asked for uncompressed and refused
compressed (never inflated), capped at 256 KiB as they arrive, and redirects are not followed.

`revoke` asks IMS to invalidate an access token. Whether production IMS honours that for
server-to-server tokens is not documented, so its answer is reported, not interpreted.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
from typing import TYPE_CHECKING, Any, Self, cast
from urllib.parse import urlencode, urlsplit

import httpx
import trio

from aemagent import __version__
from aemagent.core.logs import utc_iso
from aemagent.credentials import (
    Credential,
    DevToken,
    OAuthCredential,
    Secret,
    ServiceCredential,
    is_loopback_host,
)
from aemagent.errors import (
    ConfigError,
    IMSPermanentError,
    IMSTransientError,
    UsageError,
)
from aemagent.ims.answers import (
    clock_skew_error,
    error_from_response,
    grant_from_response,
    http_date,
    jwt_expired,
)
from aemagent.ims.assertion import sign_assertion

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from aemagent.core.clocks import Clock, Now
    from aemagent.core.source import Grant

__all__ = ["MAX_ANSWER", "IMSClient"]

log = logging.getLogger(__name__)

_USER_AGENT = f"aemagent/{__version__}"
_FORM = "application/x-www-form-urlencoded"
# IMS answers are a few KiB; a proxy or a broken endpoint must not make the daemon buffer more.
MAX_ANSWER = 256 * 1024
_FRAMING = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
_NO_REFRESH = (
    "a development token cannot be refreshed; download a new one from the AEM Developer Console"
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
        raise IMSPermanentError(f"cannot fetch a token for a {credential.kind} credential")

    async def revoke(self, credential: Credential, token: Secret) -> str:
        """Ask IMS to invalidate `token`; what IMS answered, in a few words.

        Best effort: IMS does not document whether it honours this for server-to-server tokens,
        and a 200 says only that it took the request. Raises the IMSError subclasses, with IMS's
        words; a development token raises UsageError (the agent holds nothing to revoke it with).
        """
        if isinstance(credential, DevToken):
            raise UsageError(
                "a development token cannot be revoked by the agent; it expires at "
                f"{utc_iso(credential.expires_at)}"
            )
        if not isinstance(credential, ServiceCredential | OAuthCredential):
            raise UsageError(f"a {credential.kind} credential cannot be revoked by the agent")
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
        """OAuth server-to-server (docs/IMS-WIRE.md, "Client credentials"): no JWT, so no clock-skew
        retry either; `expires_in` is in seconds here."""
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
            return grant_from_response(response, sent, unit_ms=False, ims_base=cred.ims_base)
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
            return grant_from_response(response, sent, unit_ms=True, ims_base=cred.ims_base)
        error = error_from_response(response, now_wall=self._clock.now().wall, redact=redact)
        if not jwt_expired(error):
            raise error
        ims_now = http_date(response.headers.get("date"))
        if ims_now is None:
            raise clock_skew_error(
                error, "check this machine's clock (IMS sent no Date to compare)"
            )
        skew = self._clock.now().wall - ims_now
        log.warning(
            "IMS refused the times of the JWT for %s; retrying once on IMS's clock (%+.0f s off)",
            cred.client_id,
            skew,
        )
        response, sent, redact = await self._post_jwt(url, cred, self._clock.now().wall - skew)
        if response.is_success:
            return grant_from_response(response, sent, unit_ms=True, ims_base=cred.ims_base)
        error = error_from_response(response, now_wall=self._clock.now().wall, redact=redact)
        if jwt_expired(error):
            raise clock_skew_error(
                error, f"this machine's clock differs from IMS's by {abs(skew):.0f} s"
            )
        raise error

    async def _post_jwt(
        self, url: str, cred: ServiceCredential, issued_at: float
    ) -> tuple[httpx.Response, Now, tuple[str, ...]]:
        """One attempt, with a JWT and body built for it (a retried body must never be reused)."""
        assertion = sign_assertion(cred, now_wall=issued_at, lifetime=self._jwt_lifetime)
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
        # parse_credential refuses these already; a hand-built credential must not slip through.
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
