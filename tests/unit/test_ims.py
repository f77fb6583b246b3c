from __future__ import annotations

import base64
import json
import logging
import re
import ssl
from email.utils import formatdate

import httpx
import jwt
import pytest
import trio
from imsfake import (
    BASE,
    IMS_NOW,
    Answer,
    FakeIMS,
    credential,
    devtoken,
    error_answer,
    form,
    oauth,
)
from keys import (
    CLIENT_SECRET,
    OAUTH_CLIENT_ID,
    dev_token,
    ims_token,
    key_pair,
)

from aemagent import __version__
from aemagent.core.clocks import FakeClock, Now
from aemagent.core.source import Grant
from aemagent.credentials import (
    Credential,
    DevToken,
    OAuthCredential,
    Secret,
    ServiceCredential,
    parse_credential,
)
from aemagent.daemon.httpserver import Request
from aemagent.emulator.ims import Emulator
from aemagent.errors import (
    ClockSkewError,
    ConfigError,
    IMSError,
    IMSPermanentError,
    IMSTransientError,
    UsageError,
)
from aemagent.ims import IMSClient, build_jwt_claims, parse_retry_after, token_lifetime

# --- pure pieces ----------------------------------------------------------------------------------


def test_build_jwt_claims_exactly():
    claims = build_jwt_claims(credential(), now_wall=1_800_000_000.9, lifetime=300)
    assert claims == {
        "exp": 1_800_000_300,
        "iat": 1_800_000_000,
        "iss": "1234ABCD@AdobeOrg",
        "sub": "ABC123@techacct.adobe.com",
        "aud": "https://ims-na1.adobelogin.com/c/cm-p123-e1234",
        "https://ims-na1.adobelogin.com/s/ent_aem_cloud_sdk": True,
        "https://ims-na1.adobelogin.com/s/ent_cloudmgr_sdk": True,
    }
    assert type(claims["exp"]) is int
    assert type(claims["iat"]) is int


def test_build_jwt_claims_for_a_loopback_base():
    cred = credential(imsEndpoint="http://127.0.0.1:8080", metascopes="ent_aem_cloud_api")
    claims = build_jwt_claims(cred, now_wall=100.0, lifetime=60)
    assert claims["aud"] == "http://127.0.0.1:8080/c/cm-p123-e1234"
    assert claims["http://127.0.0.1:8080/s/ent_aem_cloud_api"] is True
    assert claims["exp"] == 160


OPAQUE = "not-a-jwt"


@pytest.mark.parametrize(
    ("token", "answered", "unit_ms", "lifetime"),
    [
        (ims_token(), 1, True, 86399.999),  # the token's own expires_in wins, in ms
        (ims_token({"expires_in": 3600000}), None, True, 3600.0),
        (ims_token({"expires_in": "3600000"}), 86399, False, 3600.0),
        (OPAQUE, 86399999, True, 86399.999),  # the ms-vs-s trap: not 999 days
        (OPAQUE, "86399999", True, 86399.999),
        (OPAQUE, 86399, False, 86399.0),
        (ims_token({"expires_in": "0"}), 86399999, True, 86399.999),
        (ims_token({"expires_in": "-5"}), 86399999, True, 86399.999),
        (ims_token({"expires_in": "NaN"}), 86399999, True, 86399.999),
        (ims_token({"expires_in": True}), 86399999, True, 86399.999),
        (ims_token({"expires_in": str(400 * 86400 * 1000)}), 86399999, True, 86399.999),
        (ims_token({"created_at": "1"}), 86399999, True, 86399.999),
        ("a.!!!.c", 86399999, True, 86399.999),
        ("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c", 5000, True, 5.0),
    ],
)
def test_token_lifetime(token, answered, unit_ms, lifetime):
    assert token_lifetime(token, answered, unit_ms=unit_ms) == lifetime


@pytest.mark.parametrize("answered", [None, 0, -1, "soon", True, float("inf"), 10**400, [1]])
def test_token_lifetime_unusable(answered):
    with pytest.raises(IMSTransientError, match="IMS answered 200 without a usable token"):
        token_lifetime(OPAQUE, answered, unit_ms=True)


def test_parse_retry_after():
    assert parse_retry_after("120", now_wall=IMS_NOW) == 120.0
    assert parse_retry_after(formatdate(IMS_NOW + 30, usegmt=True), now_wall=IMS_NOW) == 30.0
    assert parse_retry_after(formatdate(IMS_NOW - 30, usegmt=True), now_wall=IMS_NOW) == 0.0
    assert parse_retry_after("Fri, 15 Jan 2027 08:00:30 -0000", now_wall=IMS_NOW) == 30.0
    assert parse_retry_after("soon", now_wall=IMS_NOW) is None
    assert parse_retry_after(None, now_wall=IMS_NOW) is None


def test_grant_repr_hides_the_token():
    grant = Grant(access_token=Secret("tok"), lifetime=1.0, sent=Now(1.0, 2.0))
    assert "tok" not in repr(grant)


# --- the JWT exchange -----------------------------------------------------------------------------


async def test_exchange_sends_exactly_what_ims_expects():
    ims = FakeIMS()
    clock = FakeClock()
    ims.on_request = lambda: clock.advance(2.5)  # the network takes a while
    async with ims.client(clock) as client:
        grant = await client.fetch(credential())
    assert grant.access_token == Secret(ims.token)
    assert grant.lifetime == 86399.999
    assert grant.sent == Now(IMS_NOW, 1000.0)  # read before sending, not after the answer

    (request,) = ims.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/ims/exchange/jwt"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["user-agent"] == f"aemagent/{__version__}"
    assert "authorization" not in request.headers
    fields = form(request)
    assert sorted(fields) == ["client_id", "client_secret", "jwt_token"]
    assert fields["client_id"] == ["cm-p123-e1234"]
    assert fields["client_secret"] == [CLIENT_SECRET]

    assertion = fields["jwt_token"][0]
    header = json.loads(base64.urlsafe_b64decode(assertion.split(".")[0] + "=="))
    assert header == {"alg": "RS256", "typ": "JWT"}
    claims = jwt.decode(
        assertion,
        key_pair().public_key,
        algorithms=["RS256"],
        audience=f"{BASE}/c/cm-p123-e1234",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == build_jwt_claims(credential(), now_wall=IMS_NOW, lifetime=300)


async def test_exchange_with_a_loopback_base_and_custom_jwt_lifetime():
    ims = FakeIMS()
    ims.answers.append(httpx.Response(200, json={"access_token": "opaque", "expires_in": 5000}))
    async with ims.client(jwt_lifetime=60) as client:
        grant = await client.fetch(credential(imsEndpoint="http://localhost:4502"))
    assert str(ims.requests[0].url) == "http://localhost:4502/ims/exchange/jwt"
    assert grant.lifetime == 5.0  # the response's expires_in, in ms at this endpoint
    claims = jwt.decode(form(ims.requests[0])["jwt_token"][0], options={"verify_signature": False})
    assert claims["exp"] == IMS_NOW + 60


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, text="<html>proxy says hi</html>"),
        httpx.Response(200, json=["access_token"]),
        httpx.Response(200, json={"token_type": "bearer", "expires_in": 86399999}),
        httpx.Response(200, json={"access_token": "", "expires_in": 86399999}),
        httpx.Response(200, json={"access_token": "two words", "expires_in": 86399999}),
        httpx.Response(200, json={"access_token": 12, "expires_in": 86399999}),
        httpx.Response(200, json={"access_token": "opaque"}),
        httpx.Response(200, json={"access_token": "opaque", "expires_in": 400 * 86400 * 1000}),
    ],
)
async def test_unusable_success_is_transient(answer):
    ims = FakeIMS()
    ims.answers.append(answer)
    async with ims.client() as client:
        with pytest.raises(IMSTransientError, match="IMS answered 200 without a usable token"):
            await client.fetch(credential())


# --- errors ---------------------------------------------------------------------------------------

REVOKED = "the certificate may have been revoked in the AEM Developer Console"
DELETED = (
    "check client id and secret; the credential may have been deleted in the AEM Developer Console"
)


@pytest.mark.parametrize(
    ("answer", "kind", "hint"),
    [
        (
            error_answer(400, "invalid_client", "invalid client_id parameter"),
            IMSPermanentError,
            DELETED,
        ),
        (
            error_answer(401, "invalid_client", "invalid client_id or client_secret"),
            IMSPermanentError,
            DELETED,
        ),
        (
            error_answer(
                400, "invalid_token", "Could not match JWT signature to any of the bindings"
            ),
            IMSPermanentError,
            REVOKED,
        ),
        (error_answer(400, "invalid_signature", "bad signature"), IMSPermanentError, REVOKED),
        (
            error_answer(400, "invalid_scope", "The metascopes in the JWT are not a subset"),
            IMSPermanentError,
            "the metascopes do not match the integration",
        ),
        (error_answer(400, "bad_request", "iss is missing"), IMSPermanentError, None),
        (error_answer(403, None), IMSPermanentError, None),
        (error_answer(500, "server_error", "oops"), IMSTransientError, None),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), IMSTransientError, None),
        (error_answer(503, None), IMSTransientError, None),
        (error_answer(429, None), IMSTransientError, None),
        (httpx.Response(302, headers={"Location": "https://elsewhere"}), IMSTransientError, None),
    ],
)
async def test_error_mapping(answer, kind, hint):
    answer.headers["X-Debug-Id"] = "a1b2c3"
    ims = FakeIMS()
    ims.answers.append(answer)
    async with ims.client() as client:
        with pytest.raises(IMSError) as info:
            await client.fetch(credential())
    error = info.value
    assert type(error) is kind
    assert error.http_status == answer.status_code
    assert error.hint == hint
    assert error.debug_id == "a1b2c3"
    message = str(error)
    assert "X-Debug-Id a1b2c3" in message
    assert f"HTTP {answer.status_code}" in message
    if error.error:
        assert f"IMS said {error.error}: {error.description}" in message
    assert len(ims.requests) == 1  # nothing is retried here but the clock-skew case


async def test_long_descriptions_are_cut():
    ims = FakeIMS()
    ims.answers.append(error_answer(400, "bad_request", "x" * 1000))
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError) as info:
            await client.fetch(credential())
    assert info.value.description == "x" * 297 + "..."


async def test_error_message_shape():
    ims = FakeIMS()
    ims.answers.append(
        error_answer(401, "invalid_client", "invalid client_id", **{"X-Debug-Id": "xyz"})
    )
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError) as info:
            await client.fetch(credential())
    assert str(info.value) == (
        "IMS refused the credential (HTTP 401); IMS said invalid_client: invalid client_id; "
        "X-Debug-Id xyz (check client id and secret; "
        "the credential may have been deleted in the AEM Developer Console)"
    )


async def test_retry_after_seconds_and_date():
    ims = FakeIMS()
    ims.answers.append(error_answer(429, None, **{"Retry-After": "120"}))
    # An HTTP date is read against IMS's own Date header, not this machine's clock.
    ims.answers.append(
        error_answer(503, None, **{"Retry-After": formatdate(IMS_NOW + 30, usegmt=True)})
    )
    async with ims.client(FakeClock(wall=IMS_NOW - 999)) as client:
        with pytest.raises(IMSTransientError, match="throttling") as info:
            await client.fetch(credential())
        assert info.value.retry_after == 120.0
        with pytest.raises(IMSTransientError, match="unavailable") as info:
            await client.fetch(credential())
        assert info.value.retry_after == 30.0


async def test_connection_errors_are_transient():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    ims = FakeIMS()
    ims.answers.append(refuse)
    async with ims.client() as client:
        with pytest.raises(IMSTransientError) as info:
            await client.fetch(credential())
    assert str(info.value) == (
        "could not reach IMS at ims-na1.adobelogin.com: [Errno 111] Connection refused"
    )
    assert isinstance(info.value.__cause__, httpx.ConnectError)


async def test_an_oversized_answer_is_refused_while_reading():
    ims = FakeIMS()
    huge = b'{"access_token": "' + b"a" * (300 * 1024) + b'"}'
    ims.answers.append(httpx.Response(200, content=huge))
    async with ims.client() as client:
        with pytest.raises(IMSTransientError, match="answered with more than 262144 bytes"):
            await client.fetch(credential())


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip", "br", "x-unknown"])
async def test_a_compressed_answer_is_refused_unread(encoding):
    """Identity is asked for; a Content-Encoding anyway is refused before any decompression
    (a few KiB of gzip-of-gzip inflate to gigabytes), as a transient IMS error."""
    import gzip

    class Stream(httpx.AsyncByteStream):  # a stream, so httpx does not decode it in advance
        async def __aiter__(self):
            yield gzip.compress(gzip.compress(b'{"error": "invalid_client"}'))

    ims = FakeIMS()
    answer = httpx.Response(400, stream=Stream(), headers={"Content-Encoding": encoding})
    ims.answers.append(answer)
    async with ims.client() as client:
        with pytest.raises(IMSTransientError) as info:
            await client.fetch(credential())
    assert str(info.value) == (
        f"IMS at ims-na1.adobelogin.com answered with Content-Encoding {encoding}"
        " although identity was asked"
    )
    assert ims.requests[0].headers["Accept-Encoding"] == "identity"


async def test_content_encoding_identity_is_accepted():
    ims = FakeIMS()
    body = json.dumps({"access_token": ims.token, "expires_in": 86399999}).encode()
    ims.answers.append(httpx.Response(200, content=body, headers={"Content-Encoding": "identity"}))
    async with ims.client() as client:
        grant = await client.fetch(credential())
    assert grant.lifetime == 86399.999


async def test_tls_failure_hints_at_the_ca():
    def untrusted(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")

    ims = FakeIMS()
    ims.answers.append(untrusted)
    async with ims.client() as client:
        with pytest.raises(IMSTransientError) as info:
            await client.fetch(credential())
    assert info.value.hint is not None
    assert "SSL_CERT_FILE" in info.value.hint


async def test_httpx_timeout_is_transient():
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    ims = FakeIMS()
    ims.answers.append(slow)
    async with ims.client() as client:
        with pytest.raises(IMSTransientError, match=r"did not answer within 20 s"):
            await client.fetch(credential())


async def test_total_timeout(autojump_clock):
    async def hang(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3600)
        return httpx.Response(200)

    client = IMSClient(clock=FakeClock(), transport=httpx.MockTransport(hang), timeout=7.5)
    async with client:
        start = trio.current_time()
        with pytest.raises(
            IMSTransientError, match=r"IMS at ims-na1.adobelogin.com did not answer within 7.5 s"
        ):
            await client.fetch(credential())
        assert trio.current_time() - start == pytest.approx(7.5)


async def test_plain_http_to_a_remote_host_is_refused():
    cred = credential()
    remote = ServiceCredential(
        client_id=cred.client_id,
        client_secret=cred.client_secret,
        org_id=cred.org_id,
        technical_account_id=cred.technical_account_id,
        technical_account_email=None,
        ims_base="http://ims-na1.adobelogin.com",
        metascopes=cred.metascopes,
        private_key=cred.private_key,
        certificate_expires_at=None,
    )
    ims = FakeIMS()
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError, match="refusing to send credentials"):
            await client.fetch(remote)
    assert ims.requests == []


# --- the clock-skew retry -------------------------------------------------------------------------


async def test_clock_skew_retry_succeeds_with_a_fresh_body(caplog):
    caplog.set_level(logging.DEBUG)
    ims = FakeIMS()
    slow_clock = FakeClock(wall=IMS_NOW - 3600)  # an hour behind: every JWT looks expired
    async with ims.client(slow_clock) as client:
        grant = await client.fetch(credential())
    assert grant.access_token == Secret(ims.token)
    first, second = ims.requests
    assert first.content != second.content  # the retry reached IMS with a body of its own
    first_jwt, second_jwt = (form(r)["jwt_token"][0] for r in (first, second))
    assert first_jwt != second_jwt
    claims = jwt.decode(second_jwt, options={"verify_signature": False})
    assert claims["exp"] == IMS_NOW + 300  # computed from IMS's Date header
    assert claims["iat"] == IMS_NOW
    assert "retrying once on IMS's clock (-3600 s off)" in caplog.text
    assert CLIENT_SECRET not in caplog.text
    assert first_jwt not in caplog.text
    assert second_jwt not in caplog.text


async def test_clock_skew_error_after_the_retry_fails_too():
    ims = FakeIMS()
    expired = error_answer(400, "invalid_token", "JWT Expired", **{"X-Debug-Id": "d9"})
    ims.answers += [expired, expired, expired]
    async with ims.client(FakeClock(wall=IMS_NOW + 620.4)) as client:
        with pytest.raises(ClockSkewError) as info:
            await client.fetch(credential())
    assert len(ims.requests) == 2
    error = info.value
    assert isinstance(error, IMSPermanentError)
    assert error.hint == "clock skew: this machine's clock differs from IMS's by 620 s"
    assert str(error) == (
        "IMS says the JWT expired (HTTP 400); IMS said invalid_token: JWT Expired; "
        "X-Debug-Id d9 (clock skew: this machine's clock differs from IMS's by 620 s)"
    )


async def test_clock_skew_without_a_date_header_is_not_retried():
    ims = FakeIMS(send_date=False)
    async with ims.client(FakeClock(wall=IMS_NOW - 3600)) as client:
        with pytest.raises(ClockSkewError, match="clock skew: check this machine's clock"):
            await client.fetch(credential())
    assert len(ims.requests) == 1


async def test_other_error_on_the_retry_is_raised_as_is():
    ims = FakeIMS()
    ims.answers += [
        error_answer(400, "invalid_token", "JWT expired"),
        error_answer(503, "server_error", "down"),
    ]
    async with ims.client() as client:
        with pytest.raises(IMSTransientError, match="IMS is unavailable"):
            await client.fetch(credential())


# --- secrets never leak ---------------------------------------------------------------------------


def echo_body(request: httpx.Request) -> httpx.Response:
    """A hostile middlebox that quotes what it was sent."""
    text = request.content.decode()
    return httpx.Response(400, json={"error": text[:80], "error_description": text})


async def test_no_secret_in_any_error_or_log(caplog):
    caplog.set_level(logging.DEBUG)
    scripts: list[list[Answer]] = [
        [echo_body],
        [error_answer(401, "invalid_client", "bad")],
        [error_answer(400, "invalid_token", "JWT expired")] * 2,
        [httpx.Response(200, json={"access_token": ims_token({"expires_in": -1})})],
        [httpx.Response(500, text="boom")],
    ]
    for script in scripts:
        ims = FakeIMS()
        ims.token = ims_token({"expires_in": "-1"})
        ims.answers += script
        async with ims.client() as client:
            with pytest.raises(IMSError) as info:
                await client.fetch(credential())
        shown = f"{info.value} {info.value!r} {info.value.description} {info.value.error}"
        secrets = [CLIENT_SECRET, ims.token, ims_token()]
        for request in ims.requests:  # the JWT's claims and signature, not its common header
            secrets += form(request)["jwt_token"][0].split(".")[1:]
        for secret in secrets:
            for chunk in (secret[i : i + 16] for i in range(0, len(secret) - 15, 8)):
                assert chunk not in shown
                assert chunk not in caplog.text
        if script == [echo_body]:
            assert info.value.error is None  # not an identifier, so not shown
            assert "client_secret=<redacted>&jwt_token=<redacted>" in str(info.value)


# --- OAuth server-to-server: client credentials ---------------------------------------------------


async def test_client_credentials_send_exactly_what_ims_expects():
    ims = FakeIMS()
    clock = FakeClock()
    ims.on_request = lambda: clock.advance(2.5)
    async with ims.client(clock) as client:
        grant = await client.fetch(oauth())
    assert grant.access_token == Secret(ims.token)
    assert grant.lifetime == 86399.999  # the token's own expires_in (ms) wins
    assert grant.sent == Now(IMS_NOW, 1000.0)

    (request,) = ims.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/ims/token/v3"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["user-agent"] == f"aemagent/{__version__}"
    assert "authorization" not in request.headers
    assert request.content.startswith(b"grant_type=client_credentials&client_id=")
    assert form(request) == {
        "grant_type": ["client_credentials"],
        "client_id": [OAUTH_CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
        "scope": ["openid,AdobeID,aem.folders"],
    }


@pytest.mark.parametrize(
    ("expires_in", "lifetime"),
    [
        (86399, 86399.0),  # seconds at this endpoint: not 86 s
        ("86399", 86399.0),
        (3600.5, 3600.5),
    ],
)
async def test_client_credentials_expires_in_is_seconds(expires_in, lifetime):
    ims = FakeIMS()
    body = {"access_token": "opaque-token", "token_type": "bearer", "expires_in": expires_in}
    ims.answers.append(httpx.Response(200, json=body))
    async with ims.client() as client:
        grant = await client.fetch(oauth())
    assert grant.lifetime == lifetime


async def test_client_credentials_milliseconds_are_not_seconds():
    # 86399999 read as seconds is 1000 days: garbage, not a token to keep for years.
    ims = FakeIMS()
    body = {"access_token": "opaque-token", "expires_in": 86399999}
    ims.answers.append(httpx.Response(200, json=body))
    async with ims.client() as client:
        with pytest.raises(IMSTransientError, match="IMS answered 200 without a usable token"):
            await client.fetch(oauth())


async def test_client_credentials_at_a_loopback_base():
    ims = FakeIMS()
    async with ims.client() as client:
        await client.fetch(oauth(ims_endpoint="http://127.0.0.1:8080"))
    assert str(ims.requests[0].url) == "http://127.0.0.1:8080/ims/token/v3"


OAUTH_DELETED = (
    "check client id and secret; "
    "the credential may have been deleted in the Adobe Developer Console"
)
OAUTH_SCOPES_HINT = (
    "the scopes are not all granted to this OAuth client; "
    "compare them with its credential in the Adobe Developer Console"
)


@pytest.mark.parametrize(
    ("answer", "kind", "hint"),
    [
        (
            error_answer(401, "invalid_client", "invalid client_secret"),
            IMSPermanentError,
            OAUTH_DELETED,
        ),
        (
            error_answer(400, "invalid_client", "unknown client_id"),
            IMSPermanentError,
            OAUTH_DELETED,
        ),
        (error_answer(400, "invalid_scope", "invalid_scope"), IMSPermanentError, OAUTH_SCOPES_HINT),
        # No JWT here: an "expired" answer is IMS's word, not clock skew, and is not retried.
        (error_answer(400, "invalid_token", "JWT expired"), IMSPermanentError, None),
        (error_answer(400, "unsupported_grant_type", "no"), IMSPermanentError, None),
        (error_answer(429, None, **{"Retry-After": "7"}), IMSTransientError, None),
        (error_answer(503, "server_error", "down"), IMSTransientError, None),
    ],
)
async def test_client_credentials_error_mapping(answer, kind, hint):
    answer.headers["X-Debug-Id"] = "oa1"
    ims = FakeIMS()
    ims.answers.append(answer)
    async with ims.client() as client:
        with pytest.raises(IMSError) as info:
            await client.fetch(oauth())
    assert type(info.value) is kind
    assert info.value.hint == hint
    assert info.value.debug_id == "oa1"
    assert len(ims.requests) == 1
    if answer.status_code == 429:
        assert info.value.retry_after == 7.0
        assert str(info.value).startswith("IMS is throttling token requests (HTTP 429)")


async def test_client_credentials_error_message_shape():
    ims = FakeIMS()
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError) as info:
            await client.fetch(oauth(client_secret="wrong-" + CLIENT_SECRET))
    assert str(info.value) == (
        "IMS refused the credential (HTTP 401); IMS said invalid_client: invalid client_secret "
        f"({OAUTH_DELETED})"
    )


async def test_client_credentials_never_show_the_secret(caplog):
    caplog.set_level(logging.DEBUG)
    ims = FakeIMS()
    ims.answers.append(echo_body)
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError) as info:
            await client.fetch(oauth())
    shown = f"{info.value} {info.value!r} {info.value.description}"
    assert "SECRETSECRET" not in shown
    assert "SECRETSECRET" not in caplog.text
    assert "client_secret=<redacted>&scope=" in str(info.value)


async def test_a_dev_token_cannot_be_fetched():
    ims = FakeIMS()
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError) as info:
            await client.fetch(devtoken())
    assert str(info.value) == (
        "a development token cannot be refreshed; download a new one from the AEM Developer Console"
    )
    assert ims.requests == []


# --- revocation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [credential, oauth], ids=["service", "oauth"])
async def test_revoke_sends_what_ims_expects(make):
    cred = make()
    token = dev_token(client_id=cred.client_id)
    ims = FakeIMS()
    async with ims.client() as client:
        said = await client.revoke(cred, Secret(token))
    assert said == "IMS accepted the revocation (HTTP 200)"
    (request,) = ims.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/ims/invalidate_token/v2"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["x-ims-clientid"] == cred.client_id
    assert "authorization" not in request.headers
    assert form(request) == {
        "token_type": ["access_token"],
        "token": [token],
        "cascading": ["all"],
        "client_id": [cred.client_id],
        "client_secret": [CLIENT_SECRET],
    }


async def test_revoke_reports_other_success_codes():
    ims = FakeIMS()
    ims.answers.append(httpx.Response(204))
    async with ims.client() as client:
        said = await client.revoke(oauth(), Secret(dev_token()))
    assert said == "IMS accepted the revocation (HTTP 204)"


@pytest.mark.parametrize(
    ("make", "answer", "kind", "message"),
    [
        (
            oauth,
            error_answer(400, "invalid_token", "token expired", **{"X-Debug-Id": "rv1"}),
            IMSPermanentError,
            (
                "IMS refused the revocation (HTTP 400); IMS said invalid_token: token expired; "
                "X-Debug-Id rv1 (the token may have expired or been revoked already)"
            ),
        ),
        (
            credential,
            error_answer(401, "invalid_client", "bad secret"),
            IMSPermanentError,
            (
                "IMS refused the revocation (HTTP 401); IMS said invalid_client: bad secret "
                f"({DELETED})"
            ),
        ),
        (
            oauth,
            error_answer(401, "invalid_client", "bad secret"),
            IMSPermanentError,
            f"IMS refused the revocation (HTTP 401); IMS said invalid_client: bad secret ({OAUTH_DELETED})",
        ),
        (
            credential,
            error_answer(400, "invalid_scope", "nope"),
            IMSPermanentError,
            "IMS refused the revocation (HTTP 400); IMS said invalid_scope: nope",
        ),
        (
            oauth,
            error_answer(429, None),
            IMSTransientError,
            "IMS is throttling requests (HTTP 429)",
        ),
        (oauth, error_answer(503, None), IMSTransientError, "IMS is unavailable (HTTP 503)"),
    ],
)
async def test_revoke_errors(make, answer, kind, message):
    ims = FakeIMS()
    ims.answers.append(answer)
    async with ims.client() as client:
        with pytest.raises(IMSError) as info:
            await client.revoke(make(), Secret(dev_token()))
    assert type(info.value) is kind
    assert str(info.value) == message


async def test_revoke_unreachable_ims_is_transient():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    ims = FakeIMS()
    ims.answers.append(refuse)
    async with ims.client() as client:
        with pytest.raises(
            IMSTransientError, match="could not reach IMS at ims-na1.adobelogin.com"
        ):
            await client.revoke(oauth(), Secret(dev_token()))


async def test_revoke_never_shows_the_token_or_the_secret(caplog):
    caplog.set_level(logging.DEBUG)
    token = dev_token()
    for make in (credential, oauth):
        ims = FakeIMS()
        ims.answers.append(echo_body)
        async with ims.client() as client:
            with pytest.raises(IMSPermanentError) as info:
                await client.revoke(make(), Secret(token))
        shown = f"{info.value} {info.value!r} {info.value.description} {caplog.text}"
        for secret in (CLIENT_SECRET, token):
            for chunk in (secret[i : i + 16] for i in range(0, len(secret) - 15, 8)):
                assert chunk not in shown
        assert "token_type=access_token&token=<redacted>&cascading=all" in str(info.value)


async def test_a_dev_token_cannot_be_revoked():
    ims = FakeIMS()
    async with ims.client() as client:
        with pytest.raises(UsageError) as info:
            await client.revoke(devtoken(), devtoken().token)
    assert str(info.value) == (
        "a development token cannot be revoked by the agent; it expires at 2027-01-16T08:00:00Z"
    )
    assert ims.requests == []


async def test_revoke_refuses_plain_http_to_a_remote_host():
    remote = OAuthCredential(
        client_id=OAUTH_CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        scopes=("openid",),
        ims_base="http://ims-na1.adobelogin.com",
    )
    ims = FakeIMS()
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError, match="refusing to send credentials"):
            await client.revoke(remote, Secret(dev_token()))
        with pytest.raises(IMSPermanentError, match="refusing to send credentials"):
            await client.fetch(remote)
    assert ims.requests == []


# --- against the emulator, an independent implementation of the same wire facts --------------------


def emulator_transport(emulator: Emulator) -> httpx.MockTransport:
    async def handle(request: httpx.Request) -> httpx.Response:
        served = await emulator.handle(
            Request(
                method=request.method,
                target=request.url.raw_path.decode(),
                path=request.url.path,
                headers=tuple((k.lower(), v) for k, v in request.headers.items()),
                body=request.content,
            )
        )
        return httpx.Response(served.status, content=served.body, headers=list(served.headers))

    return httpx.MockTransport(handle)


async def test_every_kind_against_the_emulator():
    base = "http://127.0.0.1:4502"
    emulator = Emulator(base)
    documents = emulator.credential_documents()
    creds: dict[str, Credential] = {k: parse_credential(v) for k, v in documents.items()}
    service, oauth_cred, dev = creds["service"], creds["oauth"], creds["devtoken"]
    assert isinstance(service, ServiceCredential)
    assert isinstance(oauth_cred, OAuthCredential)
    assert isinstance(dev, DevToken)
    assert service.derived_hosts() == ("*-p12345-e67890.adobeaemcloud.com",)
    assert oauth_cred.ims_base == base
    assert dev.client_id == "dev-console-prod"
    assert dev.lifetime == 86400.0
    assert abs(dev.created_at - emulator.now()) < 60

    async def aem(token: Secret) -> int:
        answer = await emulator.handle(
            Request(
                "GET", "/aem/x", "/aem/x", headers=(("authorization", f"Bearer {token.reveal()}"),)
            )
        )
        return answer.status

    client = IMSClient(clock=FakeClock(wall=emulator.now()), transport=emulator_transport(emulator))
    async with client:
        for cred in (service, oauth_cred):
            grant = await client.fetch(cred)
            assert grant.lifetime == 86400.0
            assert await aem(grant.access_token) == 200
            said = await client.revoke(cred, grant.access_token)
            assert said == "IMS accepted the revocation (HTTP 200)"
            assert await aem(grant.access_token) == 401
        assert await aem(dev.token) == 200
        with pytest.raises(IMSPermanentError, match="refused the revocation"):
            # A token of another client is refused, with the emulator's words.
            await client.revoke(oauth_cred, dev.token)


# --- networking: proxies and CAs ------------------------------------------------------------------


def test_client_options_decide_proxy_and_ca(tmp_path):
    plain = IMSClient(clock=FakeClock())
    assert plain.client_options(loopback=True) == {
        "trust_env": False,
        "proxy": None,
        "verify": True,
    }
    assert plain.client_options(loopback=False) == {
        "trust_env": True,
        "proxy": None,
        "verify": True,
    }

    ca = tmp_path / "ca.pem"
    ca.write_text(key_pair().cert_pem)
    custom = IMSClient(clock=FakeClock(), proxy="http://proxy.corp:3128", ca_file=str(ca))
    remote = custom.client_options(loopback=False)
    assert remote["trust_env"] is True
    assert remote["proxy"] == "http://proxy.corp:3128"
    assert isinstance(remote["verify"], ssl.SSLContext)
    loopback = custom.client_options(loopback=True)
    assert loopback["trust_env"] is False
    assert loopback["proxy"] is None


def test_bad_proxy_url_is_a_config_error():
    with pytest.raises(ConfigError, match="proxy must be"):
        IMSClient(clock=FakeClock(), proxy="proxy.corp:3128")


async def test_unreadable_ca_file_is_reported(tmp_path):
    async with IMSClient(clock=FakeClock(), ca_file=str(tmp_path / "missing.pem")) as client:
        with pytest.raises(
            IMSTransientError, match=r"cannot load CA certificates from .*missing\.pem"
        ):
            await client.fetch(credential())


async def start_server(nursery: trio.Nursery, answer: bytes) -> tuple[int, list[bytes]]:
    """A one-shot-per-connection HTTP server on 127.0.0.1 that records what it receives."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    seen: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            length = re.search(rb"(?im)^content-length:\s*(\d+)", data)
            while length and len(data.partition(b"\r\n\r\n")[2]) < int(length.group(1)):
                data += await stream.receive_some()
            seen.append(data)
            await stream.send_all(answer)

    await nursery.start(trio.serve_listeners, handle, listeners)
    return listeners[0].socket.getsockname()[1], seen


PROXY_VARS = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"]


def set_proxies(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for name in PROXY_VARS:
        monkeypatch.setenv(name, url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


async def test_loopback_ims_ignores_proxy_environment(nursery, monkeypatch):
    body = json.dumps({"access_token": ims_token(), "expires_in": 86399999}).encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
    answer += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    port, seen = await start_server(nursery, answer)
    set_proxies(monkeypatch, "http://127.0.0.1:1")  # a dead proxy: using it would fail
    async with IMSClient(clock=FakeClock()) as client:
        grant = await client.fetch(credential(imsEndpoint=f"http://127.0.0.1:{port}"))
    assert grant.lifetime == 86399.999
    (request,) = seen
    assert request.startswith(b"POST /ims/exchange/jwt HTTP/1.1\r\n")


async def test_remote_ims_goes_through_the_environment_proxy(nursery, monkeypatch):
    port, seen = await start_server(nursery, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    set_proxies(monkeypatch, f"http://127.0.0.1:{port}")
    async with IMSClient(clock=FakeClock()) as client:
        with pytest.raises(IMSTransientError, match="could not reach IMS"):
            await client.fetch(credential())
    assert seen[0].startswith(b"CONNECT ims-na1.adobelogin.com:443 HTTP/1.1\r\n")


async def test_explicit_proxy_wins_over_the_environment(nursery, monkeypatch):
    port, seen = await start_server(nursery, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    set_proxies(monkeypatch, "http://127.0.0.1:1")
    async with IMSClient(clock=FakeClock(), proxy=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(IMSTransientError):
            await client.fetch(credential())
    assert seen[0].startswith(b"CONNECT ims-na1.adobelogin.com:443 ")


async def test_proxy_login_required_gets_a_hint(nursery):
    answer = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
    port, _ = await start_server(nursery, answer)
    async with IMSClient(clock=FakeClock(), proxy=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(IMSTransientError, match="407 Proxy Authentication Required") as info:
            await client.fetch(credential())
    assert info.value.hint == "the proxy wants a login: put user and password in the proxy URL"
