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
    """The `integration` object of AEM service credentials (IMS.md 1.1); `extra` overrides."""
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
