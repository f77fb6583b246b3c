"""AEM service credentials: the JSON the AEM Developer Console downloads, exchanged through a JWT.

The only kind that needs `cryptography` (its private key and certificate), so it is imported only
when such a credential is parsed: `aemagent.credentials` loads without it.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from aemagent.credentials.fields import (
    Secret,
    canonical_digest,
    describe,
    fail,
    ims_base_from_endpoint,
    required,
    scope_list,
    text_field,
    token_field,
)

__all__ = ["ServiceCredential", "parse_service"]


@dataclass(frozen=True, repr=False, eq=False)
class ServiceCredential:
    """AEM service credentials, exchanged for tokens through a signed JWT (docs/IMS-WIRE.md)."""

    kind: ClassVar[str] = "service"
    refreshable: ClassVar[bool] = True  # IMS gives a new token whenever asked
    client_id: str
    client_secret: Secret
    org_id: str
    technical_account_id: str
    technical_account_email: str | None
    ims_base: str
    metascopes: tuple[str, ...]
    private_key: RSAPrivateKey
    certificate_expires_at: float | None
    # Left empty, it is computed from the other fields (so hand-built credentials get one too).
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", _service_digest(self))

    def __repr__(self) -> str:
        return (
            f"ServiceCredential(client_id={self.client_id!r}, org_id={self.org_id!r}, "
            f"ims_base={self.ims_base!r}, metascopes={self.metascopes!r})"
        )

    def default_name(self) -> str:
        match = _PROGRAM_ENV.match(self.client_id)
        if match:
            return match.group(1).lower()
        name = re.sub(r"[^a-z0-9._-]+", "-", self.client_id.lower()).strip("-._")
        return name[:64] or "service"

    def derived_hosts(self) -> tuple[str, ...]:
        """`*-p123-e1234.adobeaemcloud.com` for a `cm-p123-e1234[-suffix]` client id, else ().

        The one pattern covers the environment's author-, publish- and preview- hosts, and no
        other environment: the dash before `p` and the dot after the environment id are literal.
        """
        match = _PROGRAM_ENV.match(self.client_id)
        return (f"*-{match.group(1).lower()}.adobeaemcloud.com",) if match else ()


# ASCII digits only: `\d` would also take other scripts' digits, which no host name holds.
_PROGRAM_ENV = re.compile(r"cm-(p[0-9]+-e[0-9]+)(?:-.*)?\Z", re.IGNORECASE | re.DOTALL)
# A cert expiry below this is in seconds, not ms: 1e11 s is the year 5138, 1e11 ms is 1973.
_MS_THRESHOLD = 1e11


def _service_digest(cred: ServiceCredential) -> str:
    key_der = cred.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return canonical_digest(
        {
            "kind": cred.kind,
            "client_id": cred.client_id,
            "client_secret": cred.client_secret.reveal(),
            "org_id": cred.org_id,
            "technical_account_id": cred.technical_account_id,
            "technical_account_email": cred.technical_account_email,
            "ims_base": cred.ims_base,
            "metascopes": list(cred.metascopes),
            "private_key": base64.b64encode(key_der).decode("ascii"),
            "certificate_expires_at": cred.certificate_expires_at,
        }
    )


def parse_service(body: Mapping[Any, Any], prefix: str) -> ServiceCredential:
    """The object holding `technicalAccount` (the file itself, or its `integration`)."""
    account = required(body, "technicalAccount", prefix)
    account_path = f"{prefix}technicalAccount"
    if not isinstance(account, Mapping):
        fail(account_path, f"must be an object, got {describe(account, secret=True)}")
    client_id = token_field(account, "clientId", f"{account_path}.")
    client_secret = text_field(account, "clientSecret", f"{account_path}.", secret=True)
    org_id = token_field(body, "org", prefix)
    account_id = token_field(body, "id", prefix)
    email = body.get("email")
    if email is not None:
        email = token_field(body, "email", prefix)
    endpoint = text_field(body, "imsEndpoint", prefix)
    ims_base = ims_base_from_endpoint(endpoint, field=f"{prefix}imsEndpoint")
    metascopes = scope_list(
        required(body, "metascopes", prefix), f"{prefix}metascopes", noun="metascope", forbid="/"
    )
    expires_at = _expiry_date(body.get("certificateExpirationDate"), prefix)
    cert = None
    if body.get("publicKey") is not None:
        cert = _certificate(text_field(body, "publicKey", prefix), f"{prefix}publicKey")
        if expires_at is None:
            expires_at = cert.not_valid_after_utc.timestamp()
    # The key last: validating an RSA key is by far the slowest check.
    private_key = _private_key(
        text_field(body, "privateKey", prefix, secret=True), f"{prefix}privateKey"
    )
    if cert is not None and not _same_public_key(cert, private_key):
        fail(f"{prefix}publicKey", f"does not match {prefix}privateKey (mixed-up files?)")
    return ServiceCredential(
        client_id=client_id,
        client_secret=Secret(client_secret.strip()),
        org_id=org_id,
        technical_account_id=account_id,
        technical_account_email=email,
        ims_base=ims_base,
        metascopes=metascopes,
        private_key=private_key,
        certificate_expires_at=expires_at,
    )


# --- the fields -----------------------------------------------------------------------------------


def _expiry_date(value: object, prefix: str) -> float | None:
    """certificateExpirationDate: ISO-8601, or a number of ms (of seconds if implausibly small)."""
    field = f"{prefix}certificateExpirationDate"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        fail(field, f"must be an ISO-8601 string or a number of ms, got {describe(value)}")
    try:
        if isinstance(value, str) and not re.fullmatch(r"\s*\d+(\.\d+)?\s*", value, re.ASCII):
            when = datetime.fromisoformat(value.strip())
            seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        else:
            number = float(value)
            seconds = number / 1000 if number >= _MS_THRESHOLD else number
    except (ValueError, OverflowError):
        fail(field, f"is not an ISO-8601 date or a number of ms, got {describe(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        fail(field, f"is not a plausible date, got {describe(value)}")
    return seconds


def _pem_bytes(pem: str) -> bytes:
    # Accept \r\n files and keys whose newlines were escaped once too often ("\\n").
    if "\n" not in pem and "\\n" in pem:
        pem = pem.replace("\\n", "\n")
    return pem.replace("\r\n", "\n").strip().encode("utf-8") + b"\n"


def _private_key(pem: str, field: str) -> RSAPrivateKey:
    what = describe(pem, secret=True)
    if "-----BEGIN" not in pem:
        fail(field, f"is not a PEM private key ({what} with no -----BEGIN line)")
    if "PRIVATE KEY-----" not in pem and "BEGIN CERTIFICATE" in pem:
        fail(field, "holds a certificate, not a private key (the publicKey pasted in its place?)")
    if "-----BEGIN ENCRYPTED PRIVATE KEY" in pem or "Proc-Type: 4,ENCRYPTED" in pem:
        fail(field, "is encrypted; use the unencrypted key from the AEM Developer Console")
    try:
        key = serialization.load_pem_private_key(_pem_bytes(pem), password=None)
    # Any library failure means the same to the user, and its message is not shown: it could
    # quote part of the key.
    except Exception:
        fail(field, f"could not be read as a PEM private key ({what})")
    if not isinstance(key, RSAPrivateKey):
        fail(field, f"must be an RSA key, got {type(key).__name__.removeprefix('_')}")
    return key


def _certificate(pem: str, field: str) -> x509.Certificate:
    if "PRIVATE KEY" in pem:
        fail(field, f"holds a private key, not a certificate ({describe(pem, secret=True)})")
    try:
        return x509.load_pem_x509_certificate(_pem_bytes(pem))
    except Exception:
        fail(field, f"is not a PEM X.509 certificate ({describe(pem, secret=True)})")


def _same_public_key(cert: x509.Certificate, key: RSAPrivateKey) -> bool:
    try:
        cert_key = cert.public_key()
    except Exception:  # a certificate for an algorithm the library cannot load
        return False
    return isinstance(cert_key, RSAPublicKey) and (
        cert_key.public_numbers() == key.public_key().public_numbers()
    )
