"""The IMS emulator over real loopback HTTP; JWTs built by hand with pyjwt, not aemagent.ims."""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import functools
import itertools
import json
import math
import os
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.parse
from typing import IO, Any, cast

import httpx
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from aemagent.daemon.httpserver import Request
from aemagent.emulator import tokens as emulator_tokens
from aemagent.emulator.app import (
    Emulator,
    EmulatorSettings,
    RunningEmulator,
    add_arguments,
    run,
    serve_emulator,
)

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
DROP = object()  # a claim to leave out
# httpx builds an SSL context per client (slow) even for plain HTTP: build one for all.
SSL_CONTEXT = ssl.create_default_context()


@functools.cache
def key_pool() -> tuple[rsa.RSAPrivateKey, ...]:
    return tuple(rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4))


@pytest.fixture
def pooled_keys(monkeypatch):
    """RSA key generation is most of an emulator's start: reuse a few keys.

    Consecutive emulators in one test still get different keys, and none gets the last one.
    """
    keys = itertools.cycle(key_pool())
    monkeypatch.setattr(emulator_tokens, "_new_key", lambda: next(keys))


@pytest.fixture
async def emu(nursery, tmp_path, pooled_keys) -> RunningEmulator:
    settings = EmulatorSettings(write_credentials=tmp_path / "creds")
    running: RunningEmulator = await nursery.start(serve_emulator, settings)
    return running


@pytest.fixture
async def client():
    async with httpx.AsyncClient(trust_env=False, timeout=5, verify=SSL_CONTEXT) as client:
        yield client


def integration(emu: RunningEmulator) -> dict[str, Any]:
    document = json.loads(emu.credentials["service"].read_text())
    return cast("dict[str, Any]", document["integration"])


def oauth(emu: RunningEmulator) -> dict[str, Any]:
    return cast("dict[str, Any]", json.loads(emu.credentials["oauth"].read_text()))


def make_jwt(emu: RunningEmulator, key=None, algorithm="RS256", **overrides) -> str:
    """A JWT as IMS's JWT exchange expects it, from the written service.json."""
    creds = integration(emu)
    claims = {
        "exp": int(time.time()) + 300,
        "iss": creds["org"],
        "sub": creds["id"],
        "aud": f"{emu.url}/c/{creds['technicalAccount']['clientId']}",
        f"{emu.url}/s/ent_aem_cloud_api": True,
    }
    claims.update(overrides)
    claims = {name: value for name, value in claims.items() if value is not DROP}
    if key is None:
        key = load_key(creds["privateKey"])
    return jwt.encode(claims, key, algorithm=algorithm)


@functools.cache
def load_key(pem: str) -> rsa.RSAPrivateKey:
    # Loading checks the key's consistency, which is slow: once per key is enough.
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


async def exchange(
    client: httpx.AsyncClient, emu: RunningEmulator, token: str, **fields: object
) -> httpx.Response:
    creds = integration(emu)
    form = {
        "client_id": creds["technicalAccount"]["clientId"],
        "client_secret": creds["technicalAccount"]["clientSecret"],
        "jwt_token": token,
        **fields,
    }
    form = {name: value for name, value in form.items() if value is not DROP}
    return await client.post(f"{emu.url}/ims/exchange/jwt", data=form)


async def client_credentials(
    client: httpx.AsyncClient, emu: RunningEmulator, **fields: object
) -> httpx.Response:
    creds = oauth(emu)
    form = {
        "grant_type": "client_credentials",
        "client_id": creds["client_id"],
        "client_secret": creds["client_secret"],
        "scope": ",".join(creds["scopes"]),
        **fields,
    }
    return await client.post(f"{emu.url}/ims/token/v3", data=form)


async def service_token(client: httpx.AsyncClient, emu: RunningEmulator) -> str:
    response = await exchange(client, emu, make_jwt(emu))
    assert response.status_code == 200, response.text
    return cast("str", response.json()["access_token"])


async def aem(client: httpx.AsyncClient, emu: RunningEmulator, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await client.get(f"{emu.url}/aem/content/dam.json", headers=headers)


def refused(response: httpx.Response, status: int, error: str) -> str:
    """Assert an IMS-shaped refusal; its description."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    return cast("str", body["error_description"])


async def hook(
    client: httpx.AsyncClient, emu: RunningEmulator, method: str, name: str, body: object = None
) -> httpx.Response:
    return await client.request(method, f"{emu.url}/_emulator/{name}", json=body)


# ---- credential files ----


async def test_service_credentials_in_developer_console_format(emu):
    document = json.loads(emu.credentials["service"].read_text())
    assert document["ok"] is True
    assert document["statusCode"] == 200
    creds = document["integration"]
    assert creds["imsEndpoint"] == emu.url
    assert emu.url.startswith("http://127.0.0.1:")
    assert creds["metascopes"] == "ent_aem_cloud_api"
    assert creds["technicalAccount"]["clientId"] == "cm-p12345-e67890"
    assert creds["org"].endswith("@AdobeOrg")
    assert creds["id"].endswith("@techacct.adobe.com")
    assert creds["email"] != creds["id"]
    assert creds["privateKey"].startswith("-----BEGIN RSA PRIVATE KEY-----\r\n")
    assert "\n" not in creds["privateKey"].replace("\r\n", "")
    assert creds["publicKey"].startswith("-----BEGIN CERTIFICATE-----\r\n")
    key = serialization.load_pem_private_key(creds["privateKey"].encode(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = x509.load_pem_x509_certificate(creds["publicKey"].encode())
    cert_key = cert.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    assert cert_key.public_numbers() == key.public_key().public_numbers()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=365)
    expires = dt.datetime.strptime(creds["certificateExpirationDate"], "%Y-%m-%dT%H:%M:%S.%f%z")
    assert expires == cert.not_valid_after_utc


async def test_oauth_and_devtoken_files(emu, client):
    creds = oauth(emu)
    assert set(creds) == {"client_id", "client_secret", "scopes", "org_id", "ims_endpoint"}
    assert creds["ims_endpoint"] == emu.url
    assert "aem.folders" in creds["scopes"]
    devtoken = json.loads(emu.credentials["devtoken"].read_text())
    assert devtoken["ok"] is True
    assert devtoken["statusCode"] == 200
    response = await aem(client, emu, devtoken["accessToken"])
    assert response.status_code == 200
    assert response.json()["user_id"].endswith("@AdobeID")


async def test_credential_files_are_private(emu, tmp_path):
    directory = tmp_path / "creds"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [
        "devtoken.json",
        "oauth.json",
        "service.json",
    ]
    for name, path in emu.credentials.items():
        assert path == directory / f"{name}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_existing_directory_is_used_and_a_lax_one_warned_about(
    nursery, tmp_path, pooled_keys, caplog
):
    tmp_path.chmod(0o755)
    emu = await nursery.start(serve_emulator, EmulatorSettings(write_credentials=tmp_path))
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755  # not ours to change
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in emu.credentials.values())
    assert "open to other users" in caplog.text


async def test_unwritable_credentials_fail_the_start_and_free_the_port(
    nursery, tmp_path, pooled_keys
):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = EmulatorSettings(port=port, write_credentials=not_a_dir)
    with pytest.raises(OSError):
        await nursery.start(serve_emulator, settings)
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # EADDRINUSE if the emulator still listened
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PermissionError):
            await nursery.start(serve_emulator, EmulatorSettings(write_credentials=tmp_path / "ro"))
        assert list((tmp_path / "ro").iterdir()) == []


async def test_fresh_credentials_every_start(nursery, tmp_path):
    first = await nursery.start(serve_emulator, EmulatorSettings())
    second = await nursery.start(serve_emulator, EmulatorSettings())
    assert first.port != second.port
    assert first.credentials == {}
    one, two = first.emulator.service, second.emulator.service
    assert one.client_secret != two.client_secret
    assert one.private_key.public_key().public_numbers() != (
        two.private_key.public_key().public_numbers()
    )


# ---- JWT exchange ----


async def test_jwt_exchange_answers_milliseconds(emu, client):
    response = await exchange(client, emu, make_jwt(emu))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token_type", "access_token", "expires_in"}
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 86_400_000
    assert len(response.headers["x-debug-id"]) >= 16
    date = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
    assert abs(date - time.time()) < 5
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256"
    assert {"x5u", "kid"} <= set(header)
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert "exp" not in claims
    assert claims["type"] == "access_token"
    assert claims["client_id"] == "cm-p12345-e67890"
    assert claims["user_id"] == integration(emu)["id"]
    assert claims["expires_in"] == "86400000"
    assert isinstance(claims["created_at"], str)
    assert abs(int(claims["created_at"]) / 1000 - time.time()) < 5
    assert {"id", "as", "scope"} <= set(claims)


async def test_every_debug_id_is_fresh(emu, client):
    ids = {(await exchange(client, emu, "x")).headers["x-debug-id"] for _ in range(3)}
    assert len(ids) == 3


PRODUCTION = "https://ims-na1.adobelogin.com"


@pytest.mark.parametrize(
    ("overrides", "status", "error", "said"),
    [
        ({"iss": "OTHER@AdobeOrg"}, 400, "invalid_token", "iss"),
        ({"iss": DROP}, 400, "invalid_token", "iss"),
        ({"sub": "email"}, 400, "invalid_token", "sub"),
        ({"aud": f"{PRODUCTION}/c/cm-p12345-e67890"}, 400, "invalid_client", "aud"),
        ({"aud": DROP}, 400, "invalid_client", "aud"),
        ({"exp": "2000000000"}, 400, "invalid_token", "exp"),
        ({"exp": DROP}, 400, "invalid_token", "exp"),
        ({"exp": 2e9}, 400, "invalid_token", "exp"),
        ({"exp": "FAR_AHEAD"}, 400, "invalid_token", "24 hours"),
        ({"scope": "ms"}, 400, "invalid_scope", "not a subset"),  # the metascope left out
    ],
)
async def test_jwt_claim_rules(emu, client, overrides, status, error, said):
    if overrides.get("sub") == "email":
        overrides = {"sub": integration(emu)["email"]}  # the classic mistake
    if overrides.pop("scope", None):
        overrides[f"{emu.url}/s/ent_aem_cloud_api"] = DROP
    if overrides.get("exp") == "FAR_AHEAD":  # computed now, not when the module was collected
        overrides = {"exp": int(time.time()) + 24 * 3600 + 60}
    description = refused(await exchange(client, emu, make_jwt(emu, **overrides)), status, error)
    assert said in description


@pytest.mark.parametrize(
    "metascopes",
    [
        {"ent_cloudmgr_sdk": True},  # not in the binding
        {"ent_aem_cloud_api": True, "ent_cloudmgr_sdk": True},
        {"ent_aem_cloud_api": "true"},  # only JSON true counts
        {"ent_aem_cloud_api": False},
    ],
)
async def test_metascopes_must_be_a_subset(emu, client, metascopes):
    claims = {f"{emu.url}/s/{name}": value for name, value in metascopes.items()}
    claims[f"{emu.url}/s/ent_aem_cloud_api"] = metascopes.get("ent_aem_cloud_api", DROP)
    response = await exchange(client, emu, make_jwt(emu, **claims))
    description = refused(response, 400, "invalid_scope")
    assert description == (
        "The metascopes in the JWT are not a subset of the metascopes in the binding."
    )


async def test_metascope_claims_use_the_same_base_as_aud(emu, client):
    claims = {f"{emu.url}/s/ent_aem_cloud_api": DROP, f"{PRODUCTION}/s/ent_aem_cloud_api": True}
    refused(await exchange(client, emu, make_jwt(emu, **claims)), 400, "invalid_scope")


async def test_exp_tolerates_30_seconds_of_skew(emu, client):
    response = await exchange(client, emu, make_jwt(emu, exp=math.ceil(time.time()) - 29))
    assert response.status_code == 200, response.text
    response = await exchange(client, emu, make_jwt(emu, exp=int(time.time()) - 31))
    assert "JWT expired" in refused(response, 400, "invalid_token")


async def test_skewed_clock_and_the_date_header(nursery, client, tmp_path, pooled_keys):
    # IMS's clock an hour ahead: a JWT valid for 5 minutes by ours has expired by IMS's.
    settings = EmulatorSettings(clock_offset=3600, write_credentials=tmp_path)
    emu = await nursery.start(serve_emulator, settings)
    response = await exchange(client, emu, make_jwt(emu))
    assert "JWT expired" in refused(response, 400, "invalid_token")
    ims_now = email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
    assert ims_now == pytest.approx(time.time() + 3600, abs=5)
    # The agent's one retry: exp computed from IMS's Date header.
    response = await exchange(client, emu, make_jwt(emu, exp=int(ims_now) + 300))
    assert response.status_code == 200, response.text


async def test_clock_hook_moves_the_clock(emu, client):
    response = await hook(client, emu, "POST", "clock", {"offset": -25 * 3600})
    assert response.status_code == 200
    assert response.json()["offset"] == -25 * 3600
    response = await exchange(client, emu, make_jwt(emu))
    assert "24 hours" in refused(response, 400, "invalid_token")
    refused(await hook(client, emu, "POST", "clock", {"offset": "soon"}), 400, "bad_request")
    assert (await hook(client, emu, "GET", "clock")).json()["offset"] == -25 * 3600


async def test_signature_from_another_key(emu, client):
    other = key_pool()[-1]
    response = await exchange(client, emu, make_jwt(emu, key=other))
    assert refused(response, 400, "invalid_token") == (
        "Could not match JWT signature to any of the bindings"
    )


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "", "HS256"])
async def test_undecodable_or_not_rs256_jwt(emu, client, token):
    if token == "HS256":
        token = make_jwt(emu, key="a shared secret that is long enough", algorithm="HS256")
    refused(await exchange(client, emu, token), 400, "invalid_token")


async def test_jwt_payload_must_be_an_object(emu, client):
    key = load_key(integration(emu)["privateKey"])
    token = jwt.PyJWS().encode(b"[1, 2]", key, algorithm="RS256")
    refused(await exchange(client, emu, token), 400, "invalid_token")


async def test_expired_certificate_matches_no_binding(emu, client):
    await hook(client, emu, "POST", "clock", {"offset": 366 * 86400})
    exp = int(time.time()) + 366 * 86400 + 300
    response = await exchange(client, emu, make_jwt(emu, exp=exp))
    assert "bindings" in refused(response, 400, "invalid_token")


async def test_wrong_secret_is_401(emu, client):
    response = await exchange(client, emu, make_jwt(emu), client_secret="p8e-wrong")
    refused(response, 401, "invalid_client")


async def test_unknown_client_is_400(emu, client):
    response = await exchange(client, emu, make_jwt(emu), client_id="cm-p1-e2")
    refused(response, 400, "invalid_client")


@pytest.mark.parametrize(
    "fields",
    [
        {"jwt_token": DROP},
        {"client_secret": DROP},
        {"org_id": "x"},
        {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"},
    ],
)
async def test_form_must_have_exactly_the_three_fields(emu, client, fields):
    assert "fields" in refused(await exchange(client, emu, "x", **fields), 400, "bad_request")


async def test_form_must_be_urlencoded(emu, client):
    creds = integration(emu)
    fields = {
        "client_id": creds["technicalAccount"]["clientId"],
        "client_secret": creds["technicalAccount"]["clientSecret"],
        "jwt_token": make_jwt(emu),
    }
    url = f"{emu.url}/ims/exchange/jwt"
    refused(await client.post(url, json=fields), 400, "bad_request")
    multipart = await client.post(url, files={k: (None, v) for k, v in fields.items()})
    refused(multipart, 400, "bad_request")
    refused(await client.post(url + "/", data=fields), 404, "not_found")
    refused(await client.get(url), 405, "method_not_allowed")


# ---- client credentials ----


async def test_client_credentials_answer_seconds(emu, client):
    response = await client_credentials(client, emu)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 86_400
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["client_id"] == oauth(emu)["client_id"]
    assert claims["expires_in"] == "86400000"
    assert (await aem(client, emu, body["access_token"])).status_code == 200


async def test_client_credentials_refusals(emu, client):
    refused(await client_credentials(client, emu, scope="openid,admin"), 400, "invalid_scope")
    refused(await client_credentials(client, emu, scope=""), 400, "invalid_scope")
    response = await client_credentials(client, emu, grant_type="password")
    refused(response, 400, "unsupported_grant_type")
    refused(await client_credentials(client, emu, client_secret="x"), 401, "invalid_client")
    refused(await client_credentials(client, emu, client_id="nobody"), 400, "invalid_client")
    response = await client_credentials(client, emu, client_id="cm-p12345-e67890")
    refused(response, 400, "invalid_client")  # a JWT integration cannot use this grant


async def test_a_subset_of_scopes_is_granted(emu, client):
    response = await client_credentials(client, emu, scope="openid, aem.folders")
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["scope"] == "openid,aem.folders"


# ---- the AEM stand-in and revocation ----


async def test_aem_accepts_a_valid_token(emu, client):
    response = await aem(client, emu, await service_token(client, emu))
    assert response.status_code == 200
    assert response.json() == {
        "ok": True,
        "path": "/aem/content/dam.json",
        "client_id": "cm-p12345-e67890",
        "user_id": integration(emu)["id"],
    }


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Basic dXNlcjpwYXNz", "Bearer garbage", "Bearer a.b.c", "other-key"],
)
async def test_aem_refuses_bad_tokens(emu, client, authorization):
    if authorization == "other-key":
        other = key_pool()[-1]  # a key the fresh emulator below never uses
        fake = {"type": "access_token", "created_at": str(int(time.time() * 1000))}
        token = jwt.encode({**fake, "id": "x", "expires_in": "86400000"}, other, "RS256")
        authorization = f"Bearer {token}"
    headers = {"Authorization": authorization} if authorization else {}
    response = await client.get(f"{emu.url}/aem/x", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["error"] == "invalid_token"


async def test_aem_refuses_an_expired_token(emu, client):
    token = await service_token(client, emu)
    await hook(client, emu, "POST", "clock", {"offset": 86_400 - 5})
    assert (await aem(client, emu, token)).status_code == 200
    await hook(client, emu, "POST", "clock", {"offset": 86_400 + 1})
    response = await aem(client, emu, token)
    assert response.status_code == 401
    assert "expired" in response.json()["error_description"]


async def test_short_token_lifetime(nursery, client, tmp_path, pooled_keys):
    settings = EmulatorSettings(token_lifetime=2, write_credentials=tmp_path)
    emu = await nursery.start(serve_emulator, settings)
    response = await exchange(client, emu, make_jwt(emu))
    assert response.json()["expires_in"] == 2000
    assert (await client_credentials(client, emu)).json()["expires_in"] == 2
    devtoken = json.loads(emu.credentials["devtoken"].read_text())["accessToken"]
    await hook(client, emu, "POST", "clock", {"offset": 3})
    assert (await aem(client, emu, response.json()["access_token"])).status_code == 401
    assert (await aem(client, emu, devtoken)).status_code == 401


async def revoke(
    client: httpx.AsyncClient,
    emu: RunningEmulator,
    token: str,
    creds: tuple[str, str],
    **fields: object,
) -> httpx.Response:
    form = {
        "token_type": "access_token",
        "token": token,
        "cascading": "all",
        "client_id": creds[0],
        "client_secret": creds[1],
        **fields,
    }
    return await client.post(f"{emu.url}/ims/invalidate_token/v2", data=form)


async def test_revoked_token_is_refused(emu, client):
    token = await service_token(client, emu)
    other = await service_token(client, emu)
    tech = integration(emu)["technicalAccount"]
    response = await revoke(client, emu, token, (tech["clientId"], tech["clientSecret"]))
    assert response.status_code == 200
    response = await aem(client, emu, token)
    assert (response.status_code, response.json()["error_description"]) == (
        401,
        "the token was revoked",
    )
    assert (await aem(client, emu, other)).status_code == 200  # only that one
    response = await revoke(client, emu, token, (tech["clientId"], tech["clientSecret"]))
    assert response.status_code == 200  # again: still fine


async def test_revocation_refusals(emu, client):
    token = await service_token(client, emu)
    tech = integration(emu)["technicalAccount"]
    service = (tech["clientId"], tech["clientSecret"])
    oauth_creds = (oauth(emu)["client_id"], oauth(emu)["client_secret"])
    refused(await revoke(client, emu, token, (service[0], "x")), 401, "invalid_client")
    refused(await revoke(client, emu, token, ("nobody", "x")), 400, "invalid_client")
    refused(await revoke(client, emu, token, oauth_creds), 400, "invalid_token")
    refused(await revoke(client, emu, "garbage", service), 400, "invalid_token")
    devtoken = json.loads(emu.credentials["devtoken"].read_text())["accessToken"]
    refused(await revoke(client, emu, devtoken, service), 400, "invalid_token")
    response = await revoke(client, emu, token, service, token_type="refresh_token")
    refused(response, 400, "unsupported_token_type")
    refused(await revoke(client, emu, token, service, extra="1"), 400, "bad_request")
    assert (await aem(client, emu, token)).status_code == 200


# ---- faults ----


async def test_three_503s_then_success(emu, client):
    fault = {"endpoint": "jwt", "count": 3, "status": 503, "retry_after": "2"}
    response = await hook(client, emu, "POST", "faults", fault)
    assert response.json()["faults"] == {"jwt": 3}
    for _ in range(3):
        response = await exchange(client, emu, make_jwt(emu))
        refused(response, 503, "server_error")
        assert response.headers["retry-after"] == "2"
        assert "x-debug-id" in response.headers
    assert (await exchange(client, emu, make_jwt(emu))).status_code == 200
    assert [r["status"] for r in emu.emulator.requests] == [503, 503, 503, 200]
    assert [r["fault"] for r in emu.emulator.requests] == [True, True, True, False]


async def test_fault_with_ims_error_and_custom_body(emu, client):
    fault = {"endpoint": "token", "status": 429, "error": "too_many_requests"}
    await hook(client, emu, "POST", "faults", fault)
    await hook(client, emu, "POST", "faults", {"endpoint": "any", "status": 500, "body": "oops"})
    refused(await client_credentials(client, emu), 429, "too_many_requests")
    response = await aem(client, emu, None)  # "any" applies to the next request anywhere
    assert (response.status_code, response.text) == (500, "oops")
    assert (await client_credentials(client, emu)).status_code == 200


async def test_fault_drops_the_connection(emu, client):
    await hook(client, emu, "POST", "faults", {"endpoint": "jwt", "drop": True})
    with pytest.raises(httpx.RemoteProtocolError):
        await exchange(client, emu, make_jwt(emu))
    assert (await exchange(client, emu, make_jwt(emu))).status_code == 200
    assert emu.emulator.requests[0]["status"] is None


async def test_fault_malformed_answer(emu, client):
    await hook(client, emu, "POST", "faults", {"endpoint": "jwt", "malformed": True})
    response = await exchange(client, emu, make_jwt(emu))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_fault_delay(emu, client):
    await hook(client, emu, "POST", "faults", {"endpoint": "aem", "delay": 30})
    with pytest.raises(httpx.ReadTimeout):
        await client.get(f"{emu.url}/aem/x", timeout=0.2)
    await hook(client, emu, "POST", "faults", {"endpoint": "aem", "delay": 0.01})
    assert (await aem(client, emu, None)).status_code == 401  # delayed, then answered normally


@pytest.mark.parametrize(
    "fault",
    [
        [],
        {"endpoint": "jwt", "stauts": 503},
        {"endpoint": "ims"},
        {"endpoint": "jwt", "count": 0},
        {"endpoint": "jwt", "status": 99},
        {"endpoint": "jwt", "delay": -1},
        {"endpoint": "jwt", "drop": "yes"},
    ],
)
async def test_bad_faults_are_refused(emu, client, fault):
    refused(await hook(client, emu, "POST", "faults", fault), 400, "bad_request")
    assert not any(emu.emulator.faults.values())


async def test_faults_can_be_cleared(emu, client):
    await hook(client, emu, "POST", "faults", {"endpoint": "any", "count": 5})
    assert (await hook(client, emu, "DELETE", "faults")).json()["faults"] == {}
    assert (await exchange(client, emu, make_jwt(emu))).status_code == 200
    refused(await hook(client, emu, "GET", "nothing"), 404, "not_found")


# ---- the request log ----


async def test_request_log_has_names_and_claims_never_secrets(emu, client):
    assertion = make_jwt(emu)
    access = (await exchange(client, emu, assertion)).json()["access_token"]
    oauth_token = (await client_credentials(client, emu)).json()["access_token"]
    tech = integration(emu)["technicalAccount"]
    await revoke(client, emu, access, (tech["clientId"], tech["clientSecret"]))
    await aem(client, emu, oauth_token)
    response = await hook(client, emu, "GET", "requests")
    log = response.json()
    assert [(r["endpoint"], r["status"]) for r in log] == [
        ("jwt", 200),
        ("token", 200),
        ("invalidate", 200),
        ("aem", 200),
    ]
    first = log[0]
    assert first["method"] == "POST"
    assert first["path"] == "/ims/exchange/jwt"
    assert first["content_type"] == "application/x-www-form-urlencoded"
    assert first["fields"] == ["client_id", "client_secret", "jwt_token"]
    assert first["jwt"]["header"]["alg"] == "RS256"
    assert first["jwt"]["claims"]["sub"] == integration(emu)["id"]
    assert abs(first["time"] - time.time()) < 5
    assert log[1]["fields"] == ["client_id", "client_secret", "grant_type", "scope"]
    text = response.text
    for secret in (
        tech["clientSecret"],
        oauth(emu)["client_secret"],
        assertion,
        assertion.rsplit(".", 1)[1],  # the signature
        access,
        oauth_token,
    ):
        assert secret not in text
    await hook(client, emu, "DELETE", "requests")
    assert (await hook(client, emu, "GET", "requests")).json() == []


async def test_request_log_never_shows_a_misplaced_secret(emu, client):
    secret = integration(emu)["technicalAccount"]["clientSecret"]
    url = f"{emu.url}/ims/exchange/jwt"
    await client.post(url, json={"client_id": "x", "client_secret": secret})
    await client.post(url, content=secret.encode(), headers=FORM)  # a secret where names go
    await client.post(url, files={"client_secret": (None, secret)})
    response = await hook(client, emu, "GET", "requests")
    assert secret not in response.text
    fields = [r["fields"] for r in response.json()]
    assert fields == [None, [f"<{len(secret)} chars>"], None]


# ---- the handler without sockets ----


@functools.cache
def sans_io_emulator() -> Emulator:
    return Emulator("http://127.0.0.1:9")


FIELD_NAMES = ["client_id", "client_secret", "jwt_token", "grant_type", "scope", "token"]
FIELD_NAMES += ["token_type", "cascading", "x", ""]
PATHS = ["/ims/exchange/jwt", "/ims/token/v3", "/ims/invalidate_token/v2", "/aem/x"]


@settings(max_examples=200, deadline=None)
@given(
    path=st.sampled_from([*PATHS, "/_emulator/faults", "/_emulator/clock", "/nope"]),
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    fields=st.dictionaries(st.sampled_from(FIELD_NAMES), st.text(max_size=40), max_size=6),
    raw=st.one_of(st.none(), st.binary(max_size=200)),
    content_type=st.sampled_from([FORM["Content-Type"], "application/json", None]),
)
def test_any_request_gets_a_clean_answer(path, method, fields, raw, content_type):
    """Hostile input yields a 2xx or an IMS-shaped 4xx, never an exception or a 500."""
    emulator = sans_io_emulator()
    emulator.faults.clear()
    body = raw if raw is not None else urllib.parse.urlencode(fields).encode()
    headers = (("content-type", content_type),) if content_type else ()
    request = Request(method, path, path, headers=headers, body=body)
    response = trio.run(emulator.handle, request)
    assert 200 <= response.status < 500
    if response.status >= 400:
        assert set(json.loads(response.body)) == {"error", "error_description"}
    assert {"X-Debug-Id", "Date"} <= {name for name, _ in response.headers}


# ---- serving and the command line ----


async def test_only_loopback(nursery):
    with pytest.raises(ValueError, match="loopback"):
        await nursery.start(serve_emulator, EmulatorSettings(host="0.0.0.0"))


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(prog="aemagent emulator")
    add_arguments(result)
    return result


def test_arguments():
    args = parser().parse_args([])
    assert (args.host, args.port, args.write_credentials) == ("127.0.0.1", 8765, None)
    assert (args.token_lifetime, args.clock_offset) == (86400, 0.0)
    args = parser().parse_args(["--host", "::1", "--port", "0", "--clock-offset", "-30"])
    assert (args.host, args.port, args.clock_offset) == ("::1", 0, -30.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["--host", "0.0.0.0"],
        ["--host", "example.com"],
        ["--port", "70000"],
        ["--token-lifetime", "0"],
        ["--clock-offset", "nan"],
    ],
)
def test_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_run_reports_a_busy_port(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = parser().parse_args(["--port", str(busy.getsockname()[1])])
        assert run(args) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "cannot start" in err


EMULATOR = [sys.executable, "-m", "aemagent.emulator"]


def _readline(stream: IO[str], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "the emulator printed nothing"
    return stream.readline()


@pytest.mark.integration
def test_subprocess_prints_one_line_serves_and_stops_on_sigterm(tmp_path):
    creds = tmp_path / "creds"
    with (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(
            [*EMULATOR, "--port", "0", "--write-credentials", str(creds)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    stdout = process.stdout
    assert stdout is not None
    try:
        line = json.loads(_readline(stdout, timeout=20))
        assert line["pid"] == process.pid
        assert line["url"].startswith("http://127.0.0.1:")
        assert line["credentials"] == {
            name: str(creds / f"{name}.json") for name in ("service", "oauth", "devtoken")
        }
        devtoken = json.loads((creds / "devtoken.json").read_text())["accessToken"]
        with httpx.Client(trust_env=False, timeout=5) as http:
            response = http.get(
                f"{line['url']}/aem/x", headers={"Authorization": f"Bearer {devtoken}"}
            )
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert stdout.read() == ""  # one line, nothing else
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
    log = (tmp_path / "stderr").read_text()
    assert "GET /aem/x -> 200" in log
    assert devtoken not in log
    assert stat.S_IMODE(creds.stat().st_mode) == 0o700


async def test_serves_concurrent_clients(emu, client):
    async def one():
        assert (await exchange(client, emu, make_jwt(emu))).status_code == 200

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert len(emu.emulator.requests) == 10
