"""Test keys and credentials: RSA keys with self-signed certificates, made once per session.

Key generation is slow (tens of milliseconds), so each key is cached at module level.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

# Distinctive, so a test can tell whether any part of it leaked into a message.
CLIENT_SECRET = "p8e-SECRETSECRET-do-not-show-0123456789"
NOT_AFTER = datetime(2027, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class KeyPair:
    private_key: rsa.RSAPrivateKey
    pkcs1_pem: str  # "BEGIN RSA PRIVATE KEY" with \r\n line ends, as the Developer Console has it
    pkcs8_pem: str  # "BEGIN PRIVATE KEY" with \n
    cert_pem: str  # self-signed X.509, valid until NOT_AFTER, \r\n line ends

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def pem_fragments(self) -> list[str]:
        """Pieces of the key's PEM body: none may ever show up in a message."""
        lines = self.pkcs1_pem.split("\r\n")[1:-2] + self.pkcs8_pem.split("\n")[1:-2]
        return [line[:16] for line in lines]


@functools.cache
def key_pair(index: int = 0) -> KeyPair:
    """The `index`-th test key (2048-bit RSA), generated once per session."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"aemagent test {index}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1000 + index)
        .not_valid_before(datetime(2025, 1, 1, tzinfo=UTC))
        .not_valid_after(NOT_AFTER)
        .sign(key, hashes.SHA256())
    )
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return KeyPair(
        private_key=key,
        pkcs1_pem=pkcs1.replace("\n", "\r\n"),
        pkcs8_pem=pkcs8,
        cert_pem=cert_pem.replace("\n", "\r\n"),
    )


def integration(
    key: KeyPair | None = None, *, ims_endpoint: str = "ims-na1.adobelogin.com", **extra: Any
) -> dict[str, Any]:
    """The `integration` object of AEM service credentials (docs/IMS-WIRE.md, "Endpoints"); `extra` overrides."""
    key = key or key_pair()
    obj: dict[str, Any] = {
        "imsEndpoint": ims_endpoint,
        "metascopes": "ent_aem_cloud_sdk,ent_cloudmgr_sdk",
        "technicalAccount": {"clientId": "cm-p123-e1234", "clientSecret": CLIENT_SECRET},
        "email": "abc123@techacct.adobe.com",
        "id": "ABC123@techacct.adobe.com",
        "org": "1234ABCD@AdobeOrg",
        "privateKey": key.pkcs1_pem,
        "publicKey": key.cert_pem,
    }
    obj.update(extra)
    return obj


def service_json(key: KeyPair | None = None, **kwargs: Any) -> dict[str, Any]:
    """The whole file the AEM Developer Console hands out."""
    return {"ok": True, "integration": integration(key, **kwargs), "statusCode": 200}


def ims_token(payload: dict[str, Any] | None = None) -> str:
    """A JWT-shaped IMS access token; by default it says it lives 86399999 ms (as a string)."""
    if payload is None:
        payload = {"type": "access_token", "created_at": "1800000000000", "expires_in": "86399999"}

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'x5u': 'ims_na1-key-1.cer'})}.{part(payload)}.c2lnbmF0dXJl"


# --- OAuth server-to-server credentials (docs/IMS-WIRE.md, "Client credentials") ------------------

OAUTH_CLIENT_ID = "E0A1B2C3d4e5f60718293a4b5c6d7e8f"
OAUTH_SCOPES = ["openid", "AdobeID", "aem.folders"]
ORG_ID = "1234ABCD@AdobeOrg"
TECHNICAL_ACCOUNT_ID = "TA0123@techacct.adobe.com"
TECHNICAL_ACCOUNT_EMAIL = "ta0123@techacct.adobe.com"


def oauth_json(**extra: Any) -> dict[str, Any]:
    """aemagent's own OAuth file; `extra` overrides (a None value removes the key)."""
    obj: dict[str, Any] = {
        "client_id": OAUTH_CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scopes": list(OAUTH_SCOPES),
        "org_id": ORG_ID,
    }
    return _merged(obj, extra)


def adobe_oauth_download(**extra: Any) -> dict[str, Any]:
    """The Adobe Developer Console's "Download JSON" of an OAuth server-to-server credential."""
    obj: dict[str, Any] = {
        "CLIENT_SECRETS": [CLIENT_SECRET],
        "ORG_ID": ORG_ID,
        "SCOPES": list(OAUTH_SCOPES),
        "CLIENT_ID": OAUTH_CLIENT_ID,
        "TECHNICAL_ACCOUNT_ID": TECHNICAL_ACCOUNT_ID,
        "TECHNICAL_ACCOUNT_EMAIL": TECHNICAL_ACCOUNT_EMAIL,
    }
    return _merged(obj, extra)


def aio_oauth_config(**extra: Any) -> dict[str, Any]:
    """aio's IMS context config for OAuth server-to-server (as aio-cli-plugin-cloudmanager documents)."""
    obj: dict[str, Any] = {
        "client_id": OAUTH_CLIENT_ID,
        "client_secrets": [CLIENT_SECRET],
        "technical_account_id": TECHNICAL_ACCOUNT_ID,
        "technical_account_email": TECHNICAL_ACCOUNT_EMAIL,
        "ims_org_id": ORG_ID,
        "scopes": list(OAUTH_SCOPES),
        "oauth_enabled": True,
    }
    return _merged(obj, extra)


# --- local development tokens (docs/IMS-WIRE.md, "The access token and its lifetime") -------------

DEV_CREATED_MS = 1_800_000_000_000  # FakeClock's default wall time, in ms
DEV_LIFETIME_MS = 86_400_000  # 24 h


def dev_token(**claims: Any) -> str:
    """A local development token as IMS mints it; `claims` override (None removes a claim)."""
    payload: dict[str, Any] = {
        "id": "1800000000000_00000000-dead-beef-0000-000000000000_ue1",
        "type": "access_token",
        "client_id": "dev-console-prod",
        "user_id": "USER0123@AdobeID",
        "as": "ims-na1",
        "scope": "AdobeID,openid,read_organizations,additional_info.projectedProductContext",
        "created_at": str(DEV_CREATED_MS),
        "expires_in": str(DEV_LIFETIME_MS),
    }
    return ims_token(_merged(payload, claims))


def devtoken_json(token: str | None = None) -> dict[str, Any]:
    """The AEM Developer Console's "Get Local Development Token" file."""
    return {"ok": True, "statusCode": 200, "accessToken": token or dev_token()}


def _merged(obj: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj
