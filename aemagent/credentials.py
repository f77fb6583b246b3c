"""Credentials: parse what users download into frozen objects whose secrets never show themselves.

`parse_credential` first detects the kind of credential, then hands it to that kind's parser. Every
complaint is one `CredentialError` line that names the field by its JSON path; for a secret field
(client secret, private key) it gives the type and length, never the value, not even partly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, NoReturn, TypeAlias
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from aemagent.errors import CredentialError

__all__ = [
    "Credential",
    "Secret",
    "ServiceCredential",
    "ims_base_from_endpoint",
    "is_loopback_host",
    "parse_credential",
]


class Secret:
    """A str that never shows itself: repr, str and format are redacted; == is constant-time."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret(<redacted, {len(self._value)} chars>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(_utf8(self._value), _utf8(other._value))

    # Unhashable: a hash would be a cheap equality oracle, and nothing needs Secrets as keys.
    __hash__ = None  # type: ignore[assignment]

    # Immutable, so copies may share; pickling would be a way onto disk, so it is refused.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: object) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True, repr=False, eq=False)
class ServiceCredential:
    """AEM service credentials (IMS.md 1.1), exchanged for tokens through a signed JWT."""

    kind: ClassVar[str] = "service"
    refreshable: ClassVar[bool] = True  # IMS gives a new token whenever asked (agent.py uses it)
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


# Grows into a union as more kinds (OAuth server-to-server, local development token) arrive.
Credential: TypeAlias = ServiceCredential

_PROGRAM_ENV = re.compile(r"cm-(p\d+-e\d+)(?:-.*)?\Z", re.IGNORECASE | re.DOTALL)
_HOST_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*\.?\Z")
_DIGEST_DOMAIN = b"aemagent-credential-v1\0"
# A cert expiry below this is in seconds, not ms: 1e11 s is the year 5138, 1e11 ms is 1973.
_MS_THRESHOLD = 1e11


def _service_digest(cred: ServiceCredential) -> str:
    key_der = cred.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fields = {
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
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(_DIGEST_DOMAIN + canonical.encode("ascii")).hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# --- kind detection -------------------------------------------------------------------------------

_SERVICE_KEYS = frozenset({"technicalAccount", "imsEndpoint", "metascopes", "privateKey"})
_UNDERSTOOD = (
    "expected AEM service credentials JSON from the AEM Developer Console "
    '(an object with "integration", or the "integration" object itself)'
)


def parse_credential(raw: bytes | str | Mapping[str, Any]) -> Credential:
    """Parse any credential aemagent understands; raise CredentialError naming what is wrong."""
    obj = _load_json(raw) if isinstance(raw, (bytes, str)) else raw
    if not isinstance(obj, Mapping):
        raise CredentialError(
            f"credential must be a JSON object, got {_describe(obj, secret=True)}"
        )
    parser, body, prefix = _detect_kind(obj)
    return parser(body, prefix)


def _detect_kind(
    obj: Mapping[Any, Any],
) -> tuple[Callable[[Mapping[Any, Any], str], Credential], Mapping[Any, Any], str]:
    """Say which parser reads `obj`, the object it reads and the JSON path prefix of its fields."""
    if "integration" in obj:
        integration = obj["integration"]
        if not isinstance(integration, Mapping):
            _fail("integration", f"must be an object, got {_describe(integration, secret=True)}")
        return _parse_service, integration, "integration."
    if _SERVICE_KEYS & obj.keys():
        return _parse_service, obj, ""
    if obj.get("ok") is False:
        status = obj.get("statusCode")
        code = f" (statusCode {status})" if isinstance(status, int) else ""
        raise CredentialError(
            f"this is an error answer from the AEM Developer Console{code}, not credentials; "
            "download the service credentials again"
        )
    raise CredentialError(f"not a credential aemagent understands: {_UNDERSTOOD}")


def _load_json(raw: bytes | str) -> Any:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise CredentialError(
                f"credential is not UTF-8 text (bad byte at offset {exc.start})"
            ) from None
    try:
        return json.loads(raw.removeprefix("\ufeff"))
    # The messages are built from the error's position, never from the input text.
    except json.JSONDecodeError as exc:
        raise CredentialError(
            f"credential is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise CredentialError("credential is not valid JSON: nested too deeply") from None
    except ValueError:  # e.g. an integer with more digits than Python converts
        raise CredentialError("credential is not valid JSON: a number is too long") from None


# --- one parser per kind --------------------------------------------------------------------------


def _parse_service(body: Mapping[Any, Any], prefix: str) -> ServiceCredential:
    account = _required(body, "technicalAccount", prefix)
    account_path = f"{prefix}technicalAccount"
    if not isinstance(account, Mapping):
        _fail(account_path, f"must be an object, got {_describe(account, secret=True)}")
    client_id = _token_text(account, "clientId", f"{account_path}.")
    client_secret = _text(account, "clientSecret", f"{account_path}.", secret=True)
    org_id = _token_text(body, "org", prefix)
    account_id = _token_text(body, "id", prefix)
    email = body.get("email")
    if email is not None:
        email = _token_text(body, "email", prefix)
    endpoint = _text(body, "imsEndpoint", prefix)
    ims_base = ims_base_from_endpoint(endpoint, field=f"{prefix}imsEndpoint")
    metascopes = _metascopes(_required(body, "metascopes", prefix), f"{prefix}metascopes")
    expires_at = _expiry_date(body.get("certificateExpirationDate"), prefix)
    cert = None
    if body.get("publicKey") is not None:
        cert = _certificate(_text(body, "publicKey", prefix), f"{prefix}publicKey")
        if expires_at is None:
            expires_at = cert.not_valid_after_utc.timestamp()
    # The key last: validating an RSA key costs tens of milliseconds.
    private_key = _private_key(
        _text(body, "privateKey", prefix, secret=True), f"{prefix}privateKey"
    )
    if cert is not None and not _same_public_key(cert, private_key):
        _fail(f"{prefix}publicKey", f"does not match {prefix}privateKey (mixed-up files?)")
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


# --- fields ---------------------------------------------------------------------------------------


def _fail(field: str, complaint: str) -> NoReturn:
    raise CredentialError(f"{field} {complaint}", field=field)


def _describe(value: object, *, secret: bool = False) -> str:
    """Name a value's JSON type and size; show a short value only for non-secret scalars."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean" if secret else f"a boolean: {json.dumps(value)}"
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number (huge)"
    if isinstance(value, (int, float)):
        return "a number" if secret else f"a number: {_short(repr(value))}"
    if isinstance(value, str):
        what = f"a string of {_count(len(value), 'char')}"
        return what if secret or not value else f"{what}: {_short(repr(value))}"
    if isinstance(value, Mapping):
        return f"an object with {_count(len(value), 'key')}"
    if isinstance(value, (list, tuple)):
        return f"an array of {_count(len(value), 'item')}"
    return f"a {type(value).__name__}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _required(obj: Mapping[Any, Any], key: str, prefix: str) -> Any:
    if key not in obj or obj[key] is None:
        _fail(f"{prefix}{key}", "is missing")
    return obj[key]


def _text(obj: Mapping[Any, Any], key: str, prefix: str, *, secret: bool = False) -> str:
    """A required non-empty string that encodes as UTF-8."""
    value = _required(obj, key, prefix)
    if not isinstance(value, str) or not value.strip():
        _fail(
            f"{prefix}{key}", f"must be a non-empty string, got {_describe(value, secret=secret)}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _fail(f"{prefix}{key}", f"holds invalid text ({_describe(value, secret=True)})")
    return value


def _token_text(obj: Mapping[Any, Any], key: str, prefix: str) -> str:
    """A non-secret identifier: trimmed, and no whitespace or control characters inside."""
    value = _text(obj, key, prefix).strip()
    if any(c.isspace() or not c.isprintable() for c in value):
        _fail(
            f"{prefix}{key}",
            f"must not contain spaces or control characters: {_short(repr(value))}",
        )
    return value


def _metascopes(value: object, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list):
        items = value
    else:
        _fail(
            field, f"must be a comma-separated string or a list of strings, got {_describe(value)}"
        )
    scopes: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            _fail(f"{field}[{i}]", f"must be a string, got {_describe(item)}")
        scope = item.strip()
        if any(c.isspace() or not c.isprintable() or c == "/" for c in scope):
            _fail(field, f"holds a malformed metascope: {_short(repr(scope))}")
        if scope and scope not in scopes:
            scopes.append(scope)
    if not scopes:
        _fail(field, f"lists no metascope, got {_describe(value)}")
    return tuple(scopes)


def _expiry_date(value: object, prefix: str) -> float | None:
    """certificateExpirationDate: ISO-8601, or a number of ms (of seconds if implausibly small)."""
    field = f"{prefix}certificateExpirationDate"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        _fail(field, f"must be an ISO-8601 string or a number of ms, got {_describe(value)}")
    try:
        if isinstance(value, str) and not re.fullmatch(r"\s*\d+(\.\d+)?\s*", value, re.ASCII):
            when = datetime.fromisoformat(value.strip())
            seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        else:
            number = float(value)
            seconds = number / 1000 if number >= _MS_THRESHOLD else number
    except (ValueError, OverflowError):
        _fail(field, f"is not an ISO-8601 date or a number of ms, got {_describe(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        _fail(field, f"is not a plausible date, got {_describe(value)}")
    return seconds


def _pem_bytes(pem: str) -> bytes:
    # Accept \r\n files and keys whose newlines were escaped once too often ("\\n").
    if "\n" not in pem and "\\n" in pem:
        pem = pem.replace("\\n", "\n")
    return pem.replace("\r\n", "\n").strip().encode("utf-8") + b"\n"


def _private_key(pem: str, field: str) -> RSAPrivateKey:
    what = _describe(pem, secret=True)
    if "-----BEGIN" not in pem:
        _fail(field, f"is not a PEM private key ({what} with no -----BEGIN line)")
    if "PRIVATE KEY-----" not in pem and "BEGIN CERTIFICATE" in pem:
        _fail(field, "holds a certificate, not a private key (the publicKey pasted in its place?)")
    if "-----BEGIN ENCRYPTED PRIVATE KEY" in pem or "Proc-Type: 4,ENCRYPTED" in pem:
        _fail(field, "is encrypted; use the unencrypted key from the AEM Developer Console")
    try:
        key = serialization.load_pem_private_key(_pem_bytes(pem), password=None)
    # Any library failure means the same to the user, and its message is not shown: it could
    # quote part of the key.
    except Exception:
        _fail(field, f"could not be read as a PEM private key ({what})")
    if not isinstance(key, RSAPrivateKey):
        _fail(field, f"must be an RSA key, got {type(key).__name__.removeprefix('_')}")
    return key


def _certificate(pem: str, field: str) -> x509.Certificate:
    if "PRIVATE KEY" in pem:
        _fail(field, f"holds a private key, not a certificate ({_describe(pem, secret=True)})")
    try:
        return x509.load_pem_x509_certificate(_pem_bytes(pem))
    except Exception:
        _fail(field, f"is not a PEM X.509 certificate ({_describe(pem, secret=True)})")


def _same_public_key(cert: x509.Certificate, key: RSAPrivateKey) -> bool:
    try:
        cert_key = cert.public_key()
    except Exception:  # a certificate for an algorithm the library cannot load
        return False
    return isinstance(cert_key, RSAPublicKey) and (
        cert_key.public_numbers() == key.public_key().public_numbers()
    )


# --- IMS endpoints --------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1), brackets or not."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ims_base_from_endpoint(endpoint: str, *, field: str) -> str:
    """`ims-na1.adobelogin.com` -> `https://ims-na1.adobelogin.com`; http only for loopback."""
    text = endpoint.strip()
    shown = _short(repr(text))
    url = text if "://" in text else f"https://{text}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        _fail(field, f"is not a host name or URL: {shown}")
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("https", "http"):
        _fail(field, f"must be a host name or an https:// URL: {shown}")
    if "@" in parts.netloc or parts.query or parts.fragment or parts.path not in ("", "/"):
        _fail(field, f"must be a bare host or a base URL without path, query or user: {shown}")
    if not _is_ip(host) and not _HOST_NAME.match(host):
        _fail(field, f"does not name a valid host: {shown}")
    if scheme == "http" and not is_loopback_host(host):
        _fail(field, f"may use plain http:// only for a loopback address: {shown}")
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}" + (f":{port}" if port is not None else "")
