from __future__ import annotations

import base64
import copy
import fnmatch
import json
import pickle
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keys import (
    CLIENT_SECRET,
    NOT_AFTER,
    OAUTH_CLIENT_ID,
    OAUTH_SCOPES,
    ORG_ID,
    TECHNICAL_ACCOUNT_EMAIL,
    TECHNICAL_ACCOUNT_ID,
    adobe_oauth_download,
    aio_oauth_config,
    dev_token,
    devtoken_json,
    ims_token,
    integration,
    key_pair,
    oauth_json,
    service_json,
)

from aemagent.credentials import (
    DEFAULT_IMS_BASE,
    DevToken,
    OAuthCredential,
    Secret,
    ServiceCredential,
    ims_base_from_endpoint,
    is_loopback_host,
    parse_credential,
)
from aemagent.credentials.devtoken import looks_like_token
from aemagent.errors import CredentialError


def assert_no_secret(message: str) -> None:
    assert "SECRETSECRET" not in message
    for fragment in key_pair().pem_fragments():
        assert fragment not in message


def failure(raw: Any) -> CredentialError:
    with pytest.raises(CredentialError) as info:
        parse_credential(raw)
    message = str(info.value)
    assert "\n" not in message
    assert_no_secret(message)
    return info.value


# --- Secret ---------------------------------------------------------------------------------------


def test_secret_never_shows_itself():
    secret = Secret("hunter22")
    assert secret.reveal() == "hunter22"
    assert len(secret) == 8
    for shown in (
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret:>20}",
        "%s" % secret,  # noqa: UP031
    ):
        assert shown == "Secret(<redacted, 8 chars>)"
    assert "hunter22" not in repr([secret, {"k": secret}])


def test_secret_equality_and_hashing():
    assert Secret("abc") == Secret("abc")
    assert Secret("abc") != Secret("abd")
    assert Secret("abc") != Secret("abcd")
    assert Secret("abc") != "abc"
    assert Secret("\ud800") == Secret("\ud800")  # a lone surrogate must not crash ==
    with pytest.raises(TypeError):
        hash(Secret("abc"))


def test_secret_copies_but_does_not_pickle():
    secret = Secret("abc")
    assert copy.copy(secret) is secret
    assert copy.deepcopy(secret) is secret
    with pytest.raises(TypeError):
        pickle.dumps(secret)


# --- the happy path -------------------------------------------------------------------------------


def test_parses_developer_console_file():
    raw = json.dumps(service_json()).encode()
    cred = parse_credential(raw)
    assert isinstance(cred, ServiceCredential)
    assert cred.kind == "service"
    assert cred.client_id == "cm-p123-e1234"
    assert cred.client_secret == Secret(CLIENT_SECRET)
    assert cred.org_id == "1234ABCD@AdobeOrg"
    assert cred.technical_account_id == "ABC123@techacct.adobe.com"
    assert cred.technical_account_email == "abc123@techacct.adobe.com"
    assert cred.ims_base == "https://ims-na1.adobelogin.com"
    assert cred.metascopes == ("ent_aem_cloud_sdk", "ent_cloudmgr_sdk")
    assert cred.private_key.private_numbers() == key_pair().private_key.private_numbers()
    assert cred.certificate_expires_at == NOT_AFTER.timestamp()
    assert len(cred.digest) == 64
    assert int(cred.digest, 16) >= 0
    assert cred.default_name() == "p123-e1234"


def test_repr_shows_only_public_fields():
    cred = parse_credential(service_json())
    assert repr(cred) == (
        "ServiceCredential(client_id='cm-p123-e1234', org_id='1234ABCD@AdobeOrg', "
        "ims_base='https://ims-na1.adobelogin.com', "
        "metascopes=('ent_aem_cloud_sdk', 'ent_cloudmgr_sdk'))"
    )


def test_accepted_shapes_give_the_same_credential():
    wrapped = service_json()
    digests = {
        parse_credential(wrapped).digest,
        parse_credential(json.dumps(wrapped)).digest,
        parse_credential(json.dumps(wrapped).encode("utf-8-sig")).digest,  # with a BOM
        parse_credential("\ufeff" + json.dumps(wrapped)).digest,
        parse_credential(integration()).digest,  # the bare integration object
        parse_credential(integration(privateKey=key_pair().pkcs8_pem)).digest,
        parse_credential(integration(privateKey=key_pair().pkcs1_pem.replace("\r\n", "\n"))).digest,
        parse_credential(
            integration(privateKey=key_pair().pkcs1_pem.replace("\r\n", "\\n"))
        ).digest,
        parse_credential(
            integration(metascopes=["ent_aem_cloud_sdk", " ent_cloudmgr_sdk "])
        ).digest,
        parse_credential(integration(metascopes=" ent_aem_cloud_sdk, ,ent_cloudmgr_sdk,")).digest,
        parse_credential(integration(imsEndpoint="https://IMS-NA1.adobelogin.com/")).digest,
        parse_credential(
            integration(
                technicalAccount={
                    "clientId": "cm-p123-e1234",
                    "clientSecret": f" {CLIENT_SECRET}\n",
                }
            )
        ).digest,
    }
    assert len(digests) == 1


def test_digest_changes_with_every_field():
    base = parse_credential(integration()).digest
    changes: list[dict[str, Any]] = [
        {"technicalAccount": {"clientId": "cm-p123-e1234", "clientSecret": CLIENT_SECRET + "x"}},
        {"technicalAccount": {"clientId": "cm-p123-e9", "clientSecret": CLIENT_SECRET}},
        {"org": "other@AdobeOrg"},
        {"id": "other@techacct.adobe.com"},
        {"email": None},
        {"imsEndpoint": "ims-na1-stg1.adobelogin.com"},
        {"metascopes": "ent_aem_cloud_api"},
        {"privateKey": key_pair(1).pkcs1_pem, "publicKey": key_pair(1).cert_pem},
        {"certificateExpirationDate": "2030-01-01T00:00:00Z"},
    ]
    digests = {parse_credential(integration(**change)).digest for change in changes}
    assert len(digests) == len(changes)
    assert base not in digests
    assert CLIENT_SECRET not in base


def test_hand_built_credential_gets_a_digest():
    cred = parse_credential(integration())
    assert isinstance(cred, ServiceCredential)
    built = ServiceCredential(
        client_id=cred.client_id,
        client_secret=Secret(CLIENT_SECRET),
        org_id=cred.org_id,
        technical_account_id=cred.technical_account_id,
        technical_account_email=cred.technical_account_email,
        ims_base=cred.ims_base,
        metascopes=cred.metascopes,
        private_key=cred.private_key,
        certificate_expires_at=cred.certificate_expires_at,
    )
    assert built.digest == cred.digest


def test_optional_fields():
    cred = parse_credential(integration(email=None, publicKey=None))
    assert isinstance(cred, ServiceCredential)
    assert cred.technical_account_email is None
    assert cred.certificate_expires_at is None
    bare = integration()
    del bare["email"], bare["publicKey"]
    assert parse_credential(bare).digest == cred.digest


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-03-01T12:00:00.000Z", datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()),
        ("2026-03-01T14:00:00+02:00", datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()),
        ("2026-03-01", datetime(2026, 3, 1, tzinfo=UTC).timestamp()),
        (1772366400000, 1772366400.0),
        (1772366400123.0, 1772366400.123),
        ("1772366400000", 1772366400.0),
        (1772366400, 1772366400.0),  # seconds, not ms: too small to be ms of any plausible date
    ],
)
def test_certificate_expiration_date(value, expected):
    cred = parse_credential(integration(certificateExpirationDate=value))
    assert cred.certificate_expires_at == expected


@pytest.mark.parametrize(
    ("client_id", "name"),
    [
        ("cm-p123-e1234", "p123-e1234"),
        ("cm-p123-e1234-integration", "p123-e1234"),
        ("CM-P77-E8", "p77-e8"),
        ("Some.Client@Thing!", "some.client-thing"),
        ("0123abcdef", "0123abcdef"),
        ("__", "service"),
    ],
)
def test_default_name(client_id, name):
    account = {"clientId": client_id, "clientSecret": CLIENT_SECRET}
    assert parse_credential(integration(technicalAccount=account)).default_name() == name


# --- IMS endpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        ("ims-na1.adobelogin.com", "https://ims-na1.adobelogin.com"),
        (" ims-na1-stg1.adobelogin.com/ ", "https://ims-na1-stg1.adobelogin.com"),
        ("https://ims-na1.adobelogin.com", "https://ims-na1.adobelogin.com"),
        ("HTTPS://Ims.Example.com:8443/", "https://ims.example.com:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("http://127.9.8.7:1/", "http://127.9.8.7:1"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("127.0.0.1:9", "https://127.0.0.1:9"),
    ],
)
def test_ims_base_from_endpoint(endpoint, base):
    assert ims_base_from_endpoint(endpoint, field="x") == base


@pytest.mark.parametrize(
    ("endpoint", "complaint"),
    [
        ("http://ims-na1.adobelogin.com", "plain http:// only for a loopback address"),
        ("http://10.0.0.1:80", "plain http:// only for a loopback address"),
        ("http://localhost.evil.com", "plain http:// only for a loopback address"),
        ("https://ims.example.com/ims", "without path, query or user"),
        ("https://user:pw@ims.example.com", "without path, query or user"),
        ("https://ims.example.com?x=1", "without path, query or user"),
        ("https://ims.example.com#frag", "without path, query or user"),
        ("ftp://ims.example.com", "must be a host name or an https:// URL"),
        ("https://", "does not name a valid host"),
        ("ims example.com", "does not name a valid host"),
        ("ims_na1.example.com", "does not name a valid host"),
        ("https://ims.example.com:99999", "is not a host name or URL"),
        ("https://[::1", "is not a host name or URL"),
    ],
)
def test_ims_endpoint_refused(endpoint, complaint):
    error = failure(integration(imsEndpoint=endpoint))
    assert error.field == "imsEndpoint"
    assert complaint in str(error)
    assert str(error).startswith("imsEndpoint ")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST.", True),
        ("127.0.0.1", True),
        ("127.255.0.3", True),
        ("::1", True),
        ("[::1]", True),
        ("128.0.0.1", False),
        ("0.0.0.0", False),
        ("localhost.example.com", False),
        ("", False),
    ],
)
def test_is_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "integration.technicalAccount",
        "integration.technicalAccount.clientId",
        "integration.technicalAccount.clientSecret",
        "integration.org",
        "integration.id",
        "integration.imsEndpoint",
        "integration.metascopes",
        "integration.privateKey",
    ],
)
def test_missing_field_is_named(path):
    for remove in (True, False):
        doc = service_json()
        *parents, last = path.split(".")
        obj = doc
        for parent in parents:
            obj = obj[parent]
        if remove:
            del obj[last]
        else:
            obj[last] = None
        error = failure(json.dumps(doc))
        assert str(error) == f"{path} is missing"
        assert error.field == path


def test_wrong_types_name_type_and_length_never_a_secret_value():
    account = {"clientId": "cm-p1-e2", "clientSecret": 123456789}
    error = failure(integration(technicalAccount=account))
    assert str(error) == "technicalAccount.clientSecret must be a non-empty string, got a number"
    assert error.field == "technicalAccount.clientSecret"

    account = {"clientId": "cm-p1-e2", "clientSecret": ["a", CLIENT_SECRET]}
    error = failure(integration(technicalAccount=account))
    assert str(error).endswith("got an array of 2 items")

    error = failure(service_json(privateKey={"pem": key_pair().pkcs1_pem}))
    assert str(error) == (
        "integration.privateKey must be a non-empty string, got an object with 1 key"
    )

    error = failure(integration(technicalAccount=CLIENT_SECRET))
    assert str(error) == (
        f"technicalAccount must be an object, got a string of {len(CLIENT_SECRET)} chars"
    )

    error = failure(integration(org=1234))
    assert str(error) == "org must be a non-empty string, got a number: 1234"
    error = failure(integration(org="bad org " + "x" * 100))
    assert (
        str(error)
        == "org must not contain spaces or control characters: 'bad org " + "x" * 28 + "..."
    )
    error = failure({"integration": "oops"})
    assert str(error) == "integration must be an object, got a string of 4 chars"


def test_odd_values_are_described_not_shown():
    account = {"clientId": "cm-p1-e2", "clientSecret": "bad\ud800secret"}
    error = failure(integration(technicalAccount=account))
    assert str(error) == "technicalAccount.clientSecret holds invalid text (a string of 10 chars)"
    assert (
        str(failure(integration(org=10**50)))
        == "org must be a non-empty string, got a number (huge)"
    )
    assert str(failure(integration(org={1}))) == "org must be a non-empty string, got a set"


def test_metascopes_errors():
    error = failure(integration(metascopes=" , ,"))
    assert str(error).startswith("metascopes lists no metascope")
    assert failure(integration(metascopes=[])).field == "metascopes"
    error = failure(integration(metascopes=["ok", 3]))
    assert str(error) == "metascopes[1] must be a string, got a number: 3"
    assert error.field == "metascopes[1]"
    assert "malformed metascope" in str(failure(integration(metascopes="a b,c")))
    assert failure(integration(metascopes=7)).field == "metascopes"


def test_private_key_errors_are_clear_and_never_quote_the_key():
    key = key_pair().private_key
    encrypted_pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()
    encrypted_pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"passphrase"),
    ).decode()
    ec_key = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )
    pem = key_pair().pkcs1_pem
    broken = pem[:200] + "!!!" + pem[203:]
    cases = {
        encrypted_pkcs8: "integration.privateKey is encrypted",
        encrypted_pkcs1: "integration.privateKey is encrypted",
        key_pair().cert_pem: "integration.privateKey holds a certificate, not a private key",
        broken: "integration.privateKey could not be read as a PEM private key (a string of",
        pem[40:]: "integration.privateKey is not a PEM private key (a string of",
        ec_key: "integration.privateKey must be an RSA key, got EC",
    }
    for value, start in cases.items():
        error = failure(service_json(privateKey=value))
        assert str(error).startswith(start), str(error)
        assert error.field == "integration.privateKey"


def test_certificate_errors():
    error = failure(
        integration(publicKey="-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----")
    )
    assert str(error) == "publicKey is not a PEM X.509 certificate (a string of 58 chars)"
    error = failure(integration(publicKey=key_pair().pkcs1_pem))
    assert str(error).startswith("publicKey holds a private key, not a certificate")
    error = failure(integration(publicKey=key_pair(1).cert_pem))
    assert str(error) == "publicKey does not match privateKey (mixed-up files?)"
    error = failure(integration(certificateExpirationDate="next tuesday"))
    assert error.field == "certificateExpirationDate"
    assert "'next tuesday'" in str(error)
    assert failure(integration(certificateExpirationDate=True)).field == "certificateExpirationDate"
    assert failure(integration(certificateExpirationDate=-5)).field == "certificateExpirationDate"
    error = failure(integration(certificateExpirationDate=float("nan")))
    assert error.field == "certificateExpirationDate"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "{",
            (
                "credential is not valid JSON: "
                "Expecting property name enclosed in double quotes at line 1 column 2"
            ),
        ),
        (
            '{"integration": {"technicalAccount": {"clientSecret": "' + CLIENT_SECRET + '"}',
            "credential is not valid JSON: Expecting ',' delimiter at line 1 column 97",
        ),
        (b"\xff\xfe{}", "credential is not UTF-8 text (bad byte at offset 0)"),
        ("[" * 100_000, "credential is not valid JSON: nested too deeply"),
        ("1" * 5000, "credential is not valid JSON: a number is too long"),
        ("[1, 2]", "credential must be a JSON object or a bare token, got an array of 2 items"),
        (
            f'"{CLIENT_SECRET}"',
            (
                "credential must be a JSON object or a bare token, "
                f"got a string of {len(CLIENT_SECRET)} chars"
            ),
        ),
        ("null", "credential must be a JSON object or a bare token, got null"),
        ("", "credential is empty"),
        (" \n", "credential is empty"),
        (
            CLIENT_SECRET,
            (
                "credential is neither JSON nor a bare access token "
                "(three base64url parts separated by dots)"
            ),
        ),
    ],
)
def test_unreadable_input(raw, message):
    assert str(failure(raw)) == message


def test_unknown_kinds():
    for raw in ({}, {"clientId": "x"}, {"ok": True, "statusCode": 200}):
        assert str(failure(raw)) == (
            "not a credential aemagent understands: expected AEM service credentials "
            '(an object with "integration"), OAuth server-to-server credentials (an object with '
            '"client_id" and "client_secret", or "CLIENT_ID" and "CLIENT_SECRETS" as the Adobe '
            "Developer Console downloads them) or a local development token (an object with "
            '"accessToken", or the bare token)'
        )
    error = failure({"ok": False, "statusCode": 403, "error": "forbidden"})
    assert str(error) == (
        "this is an error answer from the AEM Developer Console (statusCode 403), "
        "not a credential; download it again"
    )


# --- OAuth server-to-server credentials -----------------------------------------------------------


def oauth_failure(raw: Any) -> CredentialError:
    error = failure(raw)
    assert "SECRETSECRET" not in repr(error.args)
    return error


@pytest.mark.parametrize(
    "raw",
    [
        adobe_oauth_download(),
        aio_oauth_config(),
        oauth_json(
            technical_account_id=TECHNICAL_ACCOUNT_ID,
            technical_account_email=TECHNICAL_ACCOUNT_EMAIL,
        ),
        # aio-cli-plugin-cloudmanager's documented config has both spellings of the secret.
        aio_oauth_config(client_secret=CLIENT_SECRET, client_secrets=["p8e-other-secret"]),
        aio_oauth_config(ims_org_id=None, org_id=ORG_ID),
        adobe_oauth_download(SCOPES="openid, AdobeID,,aem.folders ,openid"),
        adobe_oauth_download(CLIENT_SECRETS=[f" {CLIENT_SECRET}\n", "p8e-second-secret"]),
        json.dumps(adobe_oauth_download()).encode("utf-8-sig"),
    ],
)
def test_parses_every_oauth_shape(raw):
    cred = parse_credential(raw)
    assert isinstance(cred, OAuthCredential)
    assert cred.kind == "oauth"
    assert cred.refreshable is True
    assert cred.client_id == OAUTH_CLIENT_ID
    assert cred.client_secret == Secret(CLIENT_SECRET)
    assert cred.scopes == ("openid", "AdobeID", "aem.folders")
    assert cred.org_id == ORG_ID
    assert cred.technical_account_id == TECHNICAL_ACCOUNT_ID
    assert cred.technical_account_email == TECHNICAL_ACCOUNT_EMAIL
    assert cred.ims_base == "https://ims-na1.adobelogin.com"
    assert cred.certificate_expires_at is None
    assert cred.default_name() == "oauth-e0a1b2c3"
    assert cred.derived_hosts() == ()
    expected = parse_credential(adobe_oauth_download())
    assert cred.digest == expected.digest


def test_minimal_oauth_file():
    cred = parse_credential(oauth_json(org_id=None, scopes="aem.folders"))
    assert isinstance(cred, OAuthCredential)
    assert cred.org_id is None
    assert cred.technical_account_id is None
    assert cred.technical_account_email is None
    assert cred.scopes == ("aem.folders",)
    assert cred.ims_base == DEFAULT_IMS_BASE
    assert getattr(cred, "technical_account_id", "absent") is None


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        ("ims-na1-stg1.adobelogin.com", "https://ims-na1-stg1.adobelogin.com"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ],
)
def test_oauth_ims_endpoint(endpoint, base):
    for raw in (oauth_json(ims_endpoint=endpoint), adobe_oauth_download(IMS_ENDPOINT=endpoint)):
        cred = parse_credential(raw)
        assert isinstance(cred, OAuthCredential)
        assert cred.ims_base == base


def test_oauth_repr_shows_only_public_fields():
    cred = parse_credential(oauth_json())
    assert repr(cred) == (
        f"OAuthCredential(client_id={OAUTH_CLIENT_ID!r}, org_id='1234ABCD@AdobeOrg', "
        "ims_base='https://ims-na1.adobelogin.com', scopes=('openid', 'AdobeID', 'aem.folders'))"
    )
    assert CLIENT_SECRET not in f"{cred} {cred!r} {vars(cred)}"


def test_oauth_digest_changes_with_every_field():
    base = parse_credential(oauth_json()).digest
    changes: list[dict[str, Any]] = [
        {"client_secret": CLIENT_SECRET + "x"},
        {"client_id": "other"},
        {"scopes": ["openid"]},
        {"scopes": ["AdobeID", "openid", "aem.folders"]},  # the order is sent as is
        {"org_id": "other@AdobeOrg"},
        {"org_id": None},
        {"ims_endpoint": "ims-na1-stg1.adobelogin.com"},
        {"technical_account_id": TECHNICAL_ACCOUNT_ID},
        {"technical_account_email": TECHNICAL_ACCOUNT_EMAIL},
    ]
    digests = {parse_credential(oauth_json(**change)).digest for change in changes}
    assert len(digests) == len(changes)
    assert base not in digests
    assert base != parse_credential(integration()).digest


def test_hand_built_oauth_credential():
    built = OAuthCredential(
        client_id=OAUTH_CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        scopes=tuple(OAUTH_SCOPES),
        org_id=ORG_ID,
    )
    assert built.ims_base == DEFAULT_IMS_BASE
    assert built.digest == parse_credential(oauth_json()).digest


@pytest.mark.parametrize(
    ("client_id", "name"),
    [
        (OAUTH_CLIENT_ID, "oauth-e0a1b2c3"),
        ("Ab Cd Ef Gh", "oauth-ab-cd-ef"),
        ("ab.cd_ef!gh", "oauth-ab.cd_ef"),
        ("!!!!!!!!xyz", "oauth"),
        ("x", "oauth-x"),
    ],
)
def test_oauth_default_name(client_id, name):
    built = OAuthCredential(client_id=client_id, client_secret=Secret("s"), scopes=("a",))
    assert built.default_name() == name


@pytest.mark.parametrize(
    ("raw", "message", "field"),
    [
        (adobe_oauth_download(CLIENT_ID=None), "CLIENT_ID is missing", "CLIENT_ID"),
        (adobe_oauth_download(CLIENT_SECRETS=None), "CLIENT_SECRETS is missing", "CLIENT_SECRETS"),
        (adobe_oauth_download(SCOPES=None), "SCOPES is missing", "SCOPES"),
        (oauth_json(client_id=None), "client_id is missing", "client_id"),
        (oauth_json(client_secret=None), "client_secret is missing", "client_secret"),
        (oauth_json(scopes=None), "scopes is missing", "scopes"),
        (
            adobe_oauth_download(CLIENT_SECRETS=[]),
            "CLIENT_SECRETS lists no secret (an empty array)",
            "CLIENT_SECRETS",
        ),
        (
            aio_oauth_config(client_secrets=[12345]),
            "client_secrets[0] must be a non-empty string, got a number",
            "client_secrets[0]",
        ),
        (
            aio_oauth_config(client_secrets=CLIENT_SECRET + "\ud800"),
            f"client_secrets holds invalid text (a string of {len(CLIENT_SECRET) + 1} chars)",
            "client_secrets",
        ),
        (
            oauth_json(client_secret={"value": CLIENT_SECRET}),
            "client_secret must be a non-empty string, got an object with 1 key",
            "client_secret",
        ),
        (
            oauth_json(client_secret="   "),
            "client_secret must be a non-empty string, got a string of 3 chars",
            "client_secret",
        ),
        (
            oauth_json(client_id="two words"),
            "client_id must not contain spaces or control characters: 'two words'",
            "client_id",
        ),
        (
            oauth_json(client_id=7),
            "client_id must be a non-empty string, got a number: 7",
            "client_id",
        ),
        (
            adobe_oauth_download(SCOPES=5),
            "SCOPES must be a comma-separated string or a list of strings, got a number: 5",
            "SCOPES",
        ),
        (oauth_json(scopes=["openid", None]), "scopes[1] must be a string, got null", "scopes[1]"),
        (
            oauth_json(scopes=" , "),
            "scopes lists no scope, got a string of 3 chars: ' , '",
            "scopes",
        ),
        (oauth_json(scopes="open id"), "scopes holds a malformed scope: 'open id'", "scopes"),
        (
            aio_oauth_config(ims_org_id="my org"),
            "ims_org_id must not contain spaces or control characters: 'my org'",
            "ims_org_id",
        ),
        (
            oauth_json(ims_endpoint="http://ims.example.com"),
            "ims_endpoint may use plain http:// only for a loopback address: 'http://ims.example.com'",
            "ims_endpoint",
        ),
        (
            adobe_oauth_download(TECHNICAL_ACCOUNT_EMAIL=["x"]),
            "TECHNICAL_ACCOUNT_EMAIL must be a non-empty string, got an array of 1 item",
            "TECHNICAL_ACCOUNT_EMAIL",
        ),
        ({"client_secrets": [CLIENT_SECRET]}, "client_id is missing", "client_id"),
    ],
)
def test_oauth_errors_name_the_field_never_the_secret(raw, message, field):
    error = oauth_failure(raw)
    assert str(error) == message
    assert error.field == field


# --- local development tokens ---------------------------------------------------------------------


def assert_no_token(text: str, token: str) -> None:
    for chunk in (token[i : i + 16] for i in range(0, max(1, len(token) - 15), 8)):
        assert chunk not in text


def test_parses_console_file_and_bare_token():
    token = dev_token()
    shapes: list[Any] = [
        devtoken_json(token),
        {"accessToken": token},
        json.dumps(devtoken_json(token)),
        json.dumps(devtoken_json(token)).encode("utf-8-sig"),
        token,
        f"  {token}\n",
        token.encode(),
        f"Bearer {token}",
        f"BEARER  {token}",
        json.dumps(token),  # a JSON string holding the token
        {"ok": True, "statusCode": 200, "accessToken": f"{token}\r\n"},
    ]
    for raw in shapes:
        cred = parse_credential(raw)
        assert isinstance(cred, DevToken)
        assert cred.kind == "devtoken"
        assert cred.refreshable is False
        assert cred.token == Secret(token)
        assert cred.created_at == 1_800_000_000.0
        assert cred.lifetime == 86_400.0
        assert cred.expires_at == 1_800_086_400.0
        assert cred.client_id == "dev-console-prod"
        assert cred.user_id == "USER0123@AdobeID"
        assert cred.org_id is None
        assert cred.technical_account_id is None
        assert getattr(cred, "technical_account_id", "absent") is None
        assert cred.certificate_expires_at is None
        assert cred.default_name() == "devtoken"
        assert cred.derived_hosts() == ()
        assert cred.digest == parse_credential(token).digest


def test_dev_token_times_are_milliseconds():
    cred = parse_credential(dev_token(created_at="1800000000123", expires_in="86399999"))
    assert isinstance(cred, DevToken)
    assert cred.created_at == 1_800_000_000.123
    assert cred.lifetime == 86_399.999
    assert cred.expires_at == pytest.approx(1_800_086_400.122, abs=1e-6)
    # JSON numbers are read the same way as IMS's strings.
    numbers = parse_credential(dev_token(created_at=1_800_000_000_000, expires_in=3_600_000))
    assert isinstance(numbers, DevToken)
    assert (numbers.created_at, numbers.lifetime, numbers.expires_at) == (
        1_800_000_000.0,
        3_600.0,
        1_800_003_600.0,
    )


def test_dev_token_expiry_is_left_to_the_caller():
    cred = parse_credential(dev_token())
    assert isinstance(cred, DevToken)
    assert not cred.expired(1_800_086_399.999)
    assert cred.expired(1_800_086_400.0)
    # A token that expired long ago still parses: the agent says when it expired.
    old = parse_credential(dev_token(created_at="1577836800000"))
    assert isinstance(old, DevToken)
    assert old.expires_at == 1_577_923_200.0
    assert old.expired(1_800_000_000.0)


def test_dev_token_optional_claims():
    cred = parse_credential(dev_token(user_id=None, type=None, scope=None))
    assert isinstance(cred, DevToken)
    assert cred.user_id is None
    numeric = parse_credential(dev_token(user_id=12))
    assert isinstance(numeric, DevToken)
    assert numeric.user_id is None


def test_dev_token_repr_and_digest():
    token = dev_token()
    cred = parse_credential(token)
    assert repr(cred) == (
        "DevToken(client_id='dev-console-prod', user_id='USER0123@AdobeID', "
        "expires_at=2027-01-16T08:00:00Z)"
    )
    assert_no_token(repr(cred), token)
    assert len(cred.digest) == 64
    assert parse_credential(dev_token(user_id="OTHER@AdobeID")).digest != cred.digest


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("a.b.c", "its payload is not base64url-encoded JSON"),
        (f"x.{b64(b'not json')}.sig", "its payload is not base64url-encoded JSON"),
        (f"x.{b64(b'[1, 2]')}.sig", "its payload is not base64url-encoded JSON"),
        (f"x.{b64(bytes([0xFF, 0xFE]))}.sig", "its payload is not base64url-encoded JSON"),
        (
            dev_token(type="refresh_token"),
            "its type is a string of 13 chars: 'refresh_token', not access_token",
        ),
        (dev_token(created_at=None), "its payload has no created_at"),
        (dev_token(expires_in=None), "its payload has no expires_in"),
        (dev_token(client_id=None), "its payload has no client_id"),
        (
            dev_token(client_id="two words"),
            "its client_id is malformed (a string of 9 chars: 'two words')",
        ),
        (
            dev_token(created_at="soon"),
            "its created_at is not a number of ms (a string of 4 chars: 'soon')",
        ),
        (
            dev_token(created_at="-5"),
            "its created_at is not a number of ms (a string of 2 chars: '-5')",
        ),
        (dev_token(created_at=True), "its created_at is not a number of ms (a boolean: true)"),
        (dev_token(created_at=[1]), "its created_at is not a number of ms (an array of 1 item)"),
        (
            dev_token(created_at=10**30),
            "its created_at is not a number of ms (a number: 1" + "0" * 30 + ")",
        ),
        (
            dev_token(created_at="1800000000"),  # seconds, not ms: 1970
            "its created_at is not a plausible time in ms (a string of 10 chars: '1800000000')",
        ),
        (
            dev_token(created_at="99999999999999"),
            "its created_at is not a plausible time in ms (a string of 14 chars: '99999999999999')",
        ),
        (
            dev_token(expires_in="0"),
            "its expires_in is not a lifetime in ms of up to a year (a string of 1 char: '0')",
        ),
        (
            dev_token(expires_in=str(400 * 86_400_000)),
            "its expires_in is not a lifetime in ms of up to a year (a string of 11 chars: '34560000000')",
        ),
        (
            dev_token(expires_in="NaN"),
            "its expires_in is not a number of ms (a string of 3 chars: 'NaN')",
        ),
        (
            dev_token(expires_in=float("inf")),
            "its expires_in is not a number of ms (a number: inf)",
        ),
        (ims_token(), "its payload has no client_id"),
    ],
)
def test_garbage_tokens_are_refused_without_echo(token, why):
    for raw, where in ((token, "credential"), ({"accessToken": token}, "accessToken")):
        error = failure(raw)
        assert str(error) == f"{where} is not an IMS access token: {why}"
        assert error.field == (None if where == "credential" else "accessToken")
        assert_no_token(str(error), token)


def test_access_token_field_errors():
    error = failure({"accessToken": CLIENT_SECRET})
    assert str(error) == (
        "accessToken is not an IMS access token: expected three base64url parts separated by "
        f"dots, got a string of {len(CLIENT_SECRET)} chars"
    )
    error = failure({"accessToken": 5})
    assert str(error) == "accessToken must be a non-empty string, got a number"
    assert str(failure({"accessToken": None})) == "accessToken must be a non-empty string, got null"
    assert str(failure(f"{dev_token()}.extra")) == (
        "credential is neither JSON nor a bare access token (three base64url parts separated by dots)"
    )


# --- kind detection and host patterns -------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (service_json(), ServiceCredential),
        (integration(), ServiceCredential),
        (oauth_json(), OAuthCredential),
        (adobe_oauth_download(), OAuthCredential),
        (aio_oauth_config(), OAuthCredential),
        (devtoken_json(), DevToken),
        (dev_token(), DevToken),
        # AEM's sample tells its two files apart by accessToken, so it wins over anything else.
        ({**oauth_json(), "accessToken": dev_token()}, DevToken),
        ({**service_json(), "accessToken": dev_token()}, DevToken),
        # Service fields win over OAuth ones: AEM service files carry a clientId, never client_id.
        ({**integration(), "client_id": "x"}, ServiceCredential),
    ],
)
def test_kind_detection(raw, kind):
    cred = parse_credential(raw)
    assert cred.kind == kind.kind  # before `type(cred) is kind` narrows `kind` to the protocol
    assert type(cred) is kind


def test_every_kind_has_what_the_agent_reads():
    for raw in (integration(), oauth_json(), dev_token()):
        cred = parse_credential(raw)
        for name in ("kind", "client_id", "org_id", "digest", "certificate_expires_at"):
            getattr(cred, name)
        assert isinstance(cred.refreshable, bool)
        assert cred.default_name()
        assert isinstance(cred.derived_hosts(), tuple)
        assert hasattr(cred, "technical_account_id")


@pytest.mark.parametrize(
    ("client_id", "hosts"),
    [
        ("cm-p12345-e67890-integration", ("*-p12345-e67890.adobeaemcloud.com",)),
        ("cm-p12345-e67890", ("*-p12345-e67890.adobeaemcloud.com",)),
        ("CM-P77-E8", ("*-p77-e8.adobeaemcloud.com",)),
        ("cm-p12345", ()),
        ("cm-p12345-e", ()),
        ("cm-p12345-e67890x", ()),
        ("xcm-p12345-e67890", ()),
        ("cm-p\u0661\u0662-e1", ()),  # digits of another script are not a program id
        ("some.client", ()),
    ],
)
def test_service_derived_hosts(client_id, hosts):
    account = {"clientId": client_id, "clientSecret": CLIENT_SECRET}
    cred = parse_credential(integration(technicalAccount=account))
    assert cred.derived_hosts() == hosts


def test_derived_host_pattern_matches_exactly_the_environment():
    account = {"clientId": "cm-p12345-e67890-integration", "clientSecret": CLIENT_SECRET}
    cred = parse_credential(integration(technicalAccount=account))
    assert cred.default_name() == "p12345-e67890"
    (pattern,) = cred.derived_hosts()
    for host in (
        "author-p12345-e67890.adobeaemcloud.com",
        "publish-p12345-e67890.adobeaemcloud.com",
        "preview-p12345-e67890.adobeaemcloud.com",
    ):
        assert fnmatch.fnmatchcase(host, pattern)
    for host in (
        "author-p12345-e678901.adobeaemcloud.com",
        "author-p912345-e67890.adobeaemcloud.com",
        "author-p12345-e67890.adobeaemcloud.com.evil.example",
        "author-p12345-e67890.adobeaemcloud.net",
        "p12345-e67890.adobeaemcloud.com",
    ):
        assert not fnmatch.fnmatchcase(host, pattern)


# --- fuzz: anything either parses or raises CredentialError ---------------------------------------

FIELDS = [
    "technicalAccount",
    "technicalAccount.clientId",
    "technicalAccount.clientSecret",
    "org",
    "id",
    "email",
    "imsEndpoint",
    "metascopes",
    "privateKey",
    "publicKey",
    "certificateExpirationDate",
]
OAUTH_FIELDS = sorted({*oauth_json(), *adobe_oauth_download(), *aio_oauth_config(), "ims_endpoint"})
CLAIMS = ["type", "client_id", "user_id", "created_at", "expires_in"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
key_names = st.sampled_from(["integration", "ok", "accessToken", *FIELDS, *OAUTH_FIELDS]) | st.text(
    max_size=10
)
hostile = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    st.from_regex(r"[A-Za-z0-9_-]{1,20}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{1,10}", fullmatch=True),
    json_values,
    st.dictionaries(key_names, json_values, max_size=8),
    st.dictionaries(key_names, st.dictionaries(key_names, json_values, max_size=8), max_size=3),
)


def maybe_text(draw: st.DrawFn, doc: Any) -> Any:
    return json.dumps(doc) if draw(st.booleans()) else doc


@st.composite
def mutated_service(draw: st.DrawFn) -> Any:
    doc = json.loads(json.dumps(service_json()))
    *parents, last = draw(st.sampled_from(FIELDS)).split(".")
    obj = doc["integration"]
    for parent in parents:
        obj = obj[parent]
    if draw(st.booleans()):
        obj[last] = draw(json_values)
    else:
        obj.pop(last, None)
    return maybe_text(draw, doc)


@st.composite
def mutated_oauth(draw: st.DrawFn) -> Any:
    doc = draw(st.sampled_from([oauth_json, adobe_oauth_download, aio_oauth_config]))()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(OAUTH_FIELDS))
        if draw(st.booleans()):
            doc[key] = draw(json_values | st.lists(st.text(max_size=30), max_size=3))
        else:
            doc.pop(key, None)
    return maybe_text(draw, doc)


@st.composite
def mutated_dev_tokens(draw: st.DrawFn) -> Any:
    claims = {name: draw(json_values) for name in draw(st.sets(st.sampled_from(CLAIMS)))}
    token = dev_token(**claims)
    if draw(st.booleans()):
        return token
    return maybe_text(draw, devtoken_json(token))


def assert_nothing_secret(text: str, raw: Any) -> None:
    """No client secret, key or (for dev tokens) any part of the token in `text`."""
    assert_no_secret(text)
    if isinstance(raw, str) and raw.startswith("{"):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:  # not JSON after all ('{'): then nothing is a token
            return
    token = raw.get("accessToken") if isinstance(raw, dict) else raw
    if isinstance(token, str) and looks_like_token(token):
        assert_no_token(text, token.strip())


@settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.one_of(hostile, mutated_service(), mutated_oauth(), mutated_dev_tokens()))
def test_any_input_parses_or_raises_credential_error(raw):
    try:
        cred = parse_credential(raw)
    except CredentialError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message
        assert_nothing_secret(message, raw)
    else:
        assert isinstance(cred, (ServiceCredential, OAuthCredential, DevToken))
        assert_nothing_secret(f"{cred!r} {cred}", raw)
        if isinstance(cred, DevToken):
            assert cred.lifetime > 0
            assert cred.expires_at == cred.created_at + cred.lifetime


def test_only_a_service_credential_loads_cryptography() -> None:
    """The agent's core imports `aemagent.credentials`; only service credentials need the key
    library, so it is loaded when one is parsed (or `ServiceCredential` is asked for)."""
    code = (
        "import sys, json\n"
        "import aemagent.credentials as c\n"
        "loaded = lambda: any(m.split('.')[0] == 'cryptography' for m in sys.modules)\n"
        "assert not loaded()\n"
        f"c.parse_credential({json.dumps(oauth_json())!r})\n"
        f"c.parse_credential({dev_token()!r})\n"
        "assert not loaded()\n"
        "c.ServiceCredential\n"
        "assert loaded()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
