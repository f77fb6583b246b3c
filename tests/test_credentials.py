from __future__ import annotations

import copy
import json
import pickle
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keys import CLIENT_SECRET, NOT_AFTER, integration, key_pair, service_json

from aemagent.credentials import (
    Secret,
    ServiceCredential,
    ims_base_from_endpoint,
    is_loopback_host,
    parse_credential,
)
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
        ("[1, 2]", "credential must be a JSON object, got an array of 2 items"),
        (
            f'"{CLIENT_SECRET}"',
            f"credential must be a JSON object, got a string of {len(CLIENT_SECRET)} chars",
        ),
        ("null", "credential must be a JSON object, got null"),
    ],
)
def test_unreadable_input(raw, message):
    assert str(failure(raw)) == message


def test_unknown_kinds():
    error = failure({"accessToken": "x"})
    assert str(error).startswith("not a credential aemagent understands: expected AEM service")
    error = failure({"ok": False, "statusCode": 403, "error": "forbidden"})
    assert "error answer from the AEM Developer Console (statusCode 403)" in str(error)


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
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
key_names = st.sampled_from(["integration", "ok", *FIELDS]) | st.text(max_size=10)
hostile = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    json_values,
    st.dictionaries(key_names, json_values, max_size=8),
    st.dictionaries(key_names, st.dictionaries(key_names, json_values, max_size=8), max_size=3),
)


@st.composite
def mutated_credentials(draw: st.DrawFn) -> Any:
    doc = json.loads(json.dumps(service_json()))
    *parents, last = draw(st.sampled_from(FIELDS)).split(".")
    obj = doc["integration"]
    for parent in parents:
        obj = obj[parent]
    if draw(st.booleans()):
        obj[last] = draw(json_values)
    else:
        obj.pop(last, None)
    return json.dumps(doc) if draw(st.booleans()) else doc


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.one_of(hostile, mutated_credentials()))
def test_any_input_parses_or_raises_credential_error(raw):
    try:
        cred = parse_credential(raw)
    except CredentialError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message
        assert_no_secret(message)
    else:
        assert isinstance(cred, ServiceCredential)
        assert_no_secret(repr(cred))
