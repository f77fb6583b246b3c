"""The emulator's identities and tokens: what it issues, and how it checks what it is sent.

Deliberately written against cryptography and pyjwt directly, never against
`aemagent.credentials` or `aemagent.ims`: an emulator that shared the client's code would share
its bugs and agree with them. The rules are IMS's, as each function says. Nothing here does
I/O except `write_credential_files`; time is passed in as `now` (Unix seconds on the emulator's
clock).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import stat
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

logger = logging.getLogger("aemagent.emulator")

# IMS's tolerance for a JWT's `exp`: this far in the past (clock skew), a day ahead at most.
EXP_SKEW_SECONDS = 30
EXP_MAX_AHEAD_SECONDS = 24 * 3600
CERTIFICATE_DAYS = 365
NO_BINDING = "Could not match JWT signature to any of the bindings"
NOT_SUBSET = "The metascopes in the JWT are not a subset of the metascopes in the binding."
# Local development tokens are issued to Adobe's Developer Console, not to a client we know.
DEVTOKEN_CLIENT_ID = "dev-console-prod"
_KEY_ID = "emulator_key-at-1"
_JWS = jwt.PyJWS()


class Refusal(Exception):
    """An IMS error answer: `{"error", "error_description"}` with an HTTP status."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{status} {error}: {description}")
        self.status = status
        self.error = error
        self.description = description


class InvalidAccessToken(Exception):
    """A bearer token the emulator does not accept; str() says why."""


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _secret() -> str:
    return "p8e-" + secrets.token_urlsafe(24)  # the prefix Adobe's client secrets carry


@dataclass(frozen=True, repr=False)
class ServiceIntegration:
    """The AEM service credential the emulator registers (a JWT service account)."""

    client_id: str
    client_secret: str
    org_id: str
    technical_account_id: str
    technical_account_email: str
    metascopes: tuple[str, ...]
    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls, now: float) -> ServiceIntegration:
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "cm-p12345-e67890"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aemagent emulator"),
            ]
        )
        start = dt.datetime.fromtimestamp(now - 60, dt.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=CERTIFICATE_DAYS))
            .sign(key, hashes.SHA256())
        )
        return cls(
            client_id="cm-p12345-e67890",
            client_secret=_secret(),
            org_id="EMULATOR0000000000001234@AdobeOrg",
            # `sub` must be the id; the email is different so a client using it gets caught.
            technical_account_id="EMULATOR00000000000000AA@techacct.adobe.com",
            technical_account_email="emulator-aem-service-1234@techacct.adobe.com",
            metascopes=("ent_aem_cloud_api",),
            private_key=key,
            certificate=certificate,
        )

    def document(self, base_url: str) -> dict[str, Any]:
        """The AEM Developer Console's service credentials JSON, `\\r\\n` line endings and all."""
        private_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, as Adobe writes it
            serialization.NoEncryption(),
        )
        cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        expires = self.certificate.not_valid_after_utc
        return {
            "ok": True,
            "integration": {
                "imsEndpoint": base_url,
                "metascopes": ",".join(self.metascopes),
                "technicalAccount": {
                    "clientId": self.client_id,
                    "clientSecret": self.client_secret,
                },
                "email": self.technical_account_email,
                "id": self.technical_account_id,
                "org": self.org_id,
                "privateKey": private_pem.decode().replace("\n", "\r\n"),
                "publicKey": cert_pem.decode().replace("\n", "\r\n"),
                "certificateExpirationDate": expires.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            },
            "statusCode": 200,
        }


@dataclass(frozen=True, repr=False)
class OAuthClient:
    """The OAuth server-to-server client the emulator registers (client credentials)."""

    client_id: str
    client_secret: str
    org_id: str
    technical_account_id: str
    scopes: tuple[str, ...]

    @classmethod
    def generate(cls) -> OAuthClient:
        return cls(
            client_id="e0a1b2c3d4e5f60718293a4b5c6d7e8f",
            client_secret=_secret(),
            org_id="EMULATOR0000000000001234@AdobeOrg",
            technical_account_id="EMULATOR00000000000000BB@techacct.adobe.com",
            scopes=("openid", "AdobeID", "read_organizations", "aem.folders", "aem.assets.author"),
        )

    def document(self, base_url: str) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "scopes": list(self.scopes),
            "org_id": self.org_id,
            "ims_endpoint": base_url,
        }


@dataclass
class TokenIssuer:
    """Mints the emulator's access tokens, verifies them, remembers revocations."""

    key: rsa.RSAPrivateKey
    revoked: set[str] = field(default_factory=set)

    @classmethod
    def generate(cls) -> TokenIssuer:
        return cls(_new_key())

    def mint(self, *, client_id: str, user_id: str, scope: str, now: float, lifetime: int) -> str:
        created_ms = int(now * 1000)
        # As IMS's own: created_at and expires_in are strings of milliseconds, no `exp`.
        claims = {
            "id": f"{created_ms}_{uuid.uuid4()}_ue1",
            "type": "access_token",
            "client_id": client_id,
            "user_id": user_id,
            "as": "ims-emulator",
            "scope": scope,
            "created_at": str(created_ms),
            "expires_in": str(lifetime * 1000),
        }
        headers = {"x5u": f"{_KEY_ID}.cer", "kid": _KEY_ID, "itt": "at"}
        return jwt.encode(claims, self.key, algorithm="RS256", headers=headers)

    def verify(self, token: str, *, now: float, check_expiry: bool = True) -> dict[str, Any]:
        """The claims of a token this issuer minted; raises InvalidAccessToken."""
        try:
            decoded = _JWS.decode_complete(token, self.key.public_key(), algorithms=["RS256"])
            claims = json.loads(decoded["payload"])
            expires_ms = int(claims["created_at"]) + int(claims["expires_in"])
            token_id = str(claims["id"])
        except (jwt.InvalidTokenError, ValueError, TypeError, KeyError):
            raise InvalidAccessToken("the token was not issued by this emulator") from None
        if claims.get("type") != "access_token":
            raise InvalidAccessToken("the token is not an access token")
        if check_expiry and now * 1000 >= expires_ms:
            raise InvalidAccessToken("the token expired")
        if check_expiry and token_id in self.revoked:
            raise InvalidAccessToken("the token was revoked")
        return dict(claims)


def peek_jwt(token: str) -> dict[str, Any] | None:
    """Header and claims of a JWT, unverified, for the request log; None if undecodable."""
    try:
        decoded = _JWS.decode_complete(token, options={"verify_signature": False})
        claims = json.loads(decoded["payload"])
    except (jwt.InvalidTokenError, ValueError):
        return None
    return {"header": decoded["header"], "claims": claims}


def check_jwt_assertion(
    token: str, integration: ServiceIntegration, base_url: str, now: float
) -> tuple[str, ...]:
    """Every IMS rule for a JWT exchange; the granted metascopes."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise Refusal(400, "invalid_token", "The JWT could not be decoded") from None
    if header.get("alg") != "RS256":
        raise Refusal(400, "invalid_token", f"JWT alg must be RS256, not {header.get('alg')!r}")
    certificate = integration.certificate
    try:
        decoded = _JWS.decode_complete(token, certificate.public_key(), algorithms=["RS256"])  # type: ignore[arg-type]
        claims = json.loads(decoded["payload"])
    except jwt.InvalidSignatureError:
        raise Refusal(400, "invalid_token", NO_BINDING) from None
    except (jwt.InvalidTokenError, ValueError):
        raise Refusal(400, "invalid_token", "The JWT could not be decoded") from None
    if not isinstance(claims, dict):
        raise Refusal(400, "invalid_token", "The JWT payload is not a JSON object")
    # An expired certificate is a binding that matches nothing.
    if now > certificate.not_valid_after_utc.timestamp():
        raise Refusal(400, "invalid_token", NO_BINDING)
    _check_exp(claims.get("exp"), now)
    if claims.get("iss") != integration.org_id:
        raise Refusal(400, "invalid_token", "JWT iss claim does not match the binding's org")
    if claims.get("sub") != integration.technical_account_id:
        raise Refusal(400, "invalid_token", "JWT sub claim does not match the technical account")
    expected_aud = f"{base_url}/c/{integration.client_id}"
    if claims.get("aud") != expected_aud:
        raise Refusal(400, "invalid_client", f"JWT aud claim must be {expected_aud}")
    prefix = f"{base_url}/s/"
    asked = {
        name.removeprefix(prefix)
        for name, v in claims.items()
        if name.startswith(prefix) and v is True
    }
    if not asked or not asked <= set(integration.metascopes):
        raise Refusal(400, "invalid_scope", NOT_SUBSET)
    return tuple(sorted(asked))


def _check_exp(exp: object, now: float) -> None:
    if exp is None:
        raise Refusal(400, "invalid_token", "JWT exp claim is missing")
    if type(exp) is not int:  # not bool, not float, not a string of digits
        raise Refusal(400, "invalid_token", "JWT exp claim must be an integer (Unix seconds)")
    if exp < now - EXP_SKEW_SECONDS:
        # The agent looks for "JWT expired" to detect clock skew; keep those words.
        raise Refusal(400, "invalid_token", f"JWT expired {int(now - exp)} s ago by IMS's clock")
    if exp > now + EXP_MAX_AHEAD_SECONDS:
        raise Refusal(400, "invalid_token", "JWT exp claim is more than 24 hours ahead")


def write_credential_files(directory: Path, documents: Mapping[str, object]) -> dict[str, Path]:
    """Write `<name>.json` for each document into `directory`; their absolute paths.

    The directory is created 0700 if missing; each file is created 0600 under a temporary name
    and renamed into place, so no secret is readable by others for even an instant.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is open to other users; the credential files in it are 0600", directory)
    paths = {}
    for name, document in documents.items():
        path = directory.absolute() / f"{name}.json"
        _write_private(path, json.dumps(document, indent=2) + "\n")
        paths[name] = path
    return paths


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
