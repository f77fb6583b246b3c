"""What every kind of credential shares: `Secret`, field readers, the digest and the IMS base rule.

The readers raise one `CredentialError` line that names the field by its JSON path; for a secret
field they give its type and length, never its value, not even partly. The kind detection
(`aemagent.credentials`) and the per-kind modules build on these.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

from aemagent.errors import CredentialError

__all__ = [
    "DEFAULT_IMS_BASE",
    "Secret",
    "canonical_digest",
    "describe",
    "fail",
    "ims_base_from_endpoint",
    "is_loopback_host",
    "required",
    "scope_list",
    "short",
    "text_field",
    "text_value",
    "token_field",
]

# Production IMS, for credentials whose file names no endpoint (OAuth downloads never do).
DEFAULT_IMS_BASE = "https://ims-na1.adobelogin.com"

_HOST_NAME = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*\.?\Z")
# Bumping this would make every loaded credential look changed after an upgrade: don't.
_DIGEST_DOMAIN = b"aemagent-credential-v1\0"


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


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def canonical_digest(fields: Mapping[str, Any]) -> str:
    """sha256 of a canonical JSON of `fields` (which include the kind): equal digest = unchanged."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(_DIGEST_DOMAIN + canonical.encode("ascii")).hexdigest()


# --- fields ---------------------------------------------------------------------------------------


def fail(field: str, complaint: str) -> NoReturn:
    raise CredentialError(f"{field} {complaint}", field=field)


def describe(value: object, *, secret: bool = False) -> str:
    """Name a value's JSON type and size; show a short value only for non-secret scalars."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean" if secret else f"a boolean: {json.dumps(value)}"
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number (huge)"
    if isinstance(value, (int, float)):
        return "a number" if secret else f"a number: {short(repr(value))}"
    if isinstance(value, str):
        what = f"a string of {_count(len(value), 'char')}"
        return what if secret or not value else f"{what}: {short(repr(value))}"
    if isinstance(value, Mapping):
        return f"an object with {_count(len(value), 'key')}"
    if isinstance(value, (list, tuple)):
        return f"an array of {_count(len(value), 'item')}"
    return f"a {type(value).__name__}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def required(obj: Mapping[Any, Any], key: str, prefix: str) -> Any:
    if key not in obj or obj[key] is None:
        fail(f"{prefix}{key}", "is missing")
    return obj[key]


def text_field(obj: Mapping[Any, Any], key: str, prefix: str, *, secret: bool = False) -> str:
    """A required non-empty string that encodes as UTF-8."""
    return text_value(required(obj, key, prefix), f"{prefix}{key}", secret=secret)


def text_value(value: object, field: str, *, secret: bool = False) -> str:
    """`value` if it is a non-empty string that encodes as UTF-8."""
    if not isinstance(value, str) or not value.strip():
        fail(field, f"must be a non-empty string, got {describe(value, secret=secret)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        fail(field, f"holds invalid text ({describe(value, secret=True)})")
    return value


def token_field(obj: Mapping[Any, Any], key: str, prefix: str) -> str:
    """A non-secret identifier: trimmed, and no whitespace or control characters inside."""
    value = text_field(obj, key, prefix).strip()
    if any(c.isspace() or not c.isprintable() for c in value):
        fail(
            f"{prefix}{key}",
            f"must not contain spaces or control characters: {short(repr(value))}",
        )
    return value


def scope_list(value: object, field: str, *, noun: str, forbid: str = "") -> tuple[str, ...]:
    """A comma-separated string or a list of strings (items may hold commas too), deduplicated.

    Scopes go into a comma-joined form field or, for metascopes, into JWT claim URLs, so a
    scope holding whitespace, control characters or any of `forbid` is refused.
    """
    if isinstance(value, str):
        items: list[object] = [value]
    elif isinstance(value, list):
        items = value
    else:
        fail(field, f"must be a comma-separated string or a list of strings, got {describe(value)}")
    scopes: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            fail(f"{field}[{i}]", f"must be a string, got {describe(item)}")
        for part in item.split(","):
            scope = part.strip()
            if any(c.isspace() or not c.isprintable() or c in forbid for c in scope):
                fail(field, f"holds a malformed {noun}: {short(repr(scope))}")
            if scope and scope not in scopes:
                scopes.append(scope)
    if not scopes:
        fail(field, f"lists no {noun}, got {describe(value)}")
    return tuple(scopes)


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
    shown = short(repr(text))
    url = text if "://" in text else f"https://{text}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        fail(field, f"is not a host name or URL: {shown}")
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in ("https", "http"):
        fail(field, f"must be a host name or an https:// URL: {shown}")
    if "@" in parts.netloc or parts.query or parts.fragment or parts.path not in ("", "/"):
        fail(field, f"must be a bare host or a base URL without path, query or user: {shown}")
    if not _is_ip(host) and not _HOST_NAME.match(host):
        fail(field, f"does not name a valid host: {shown}")
    if scheme == "http" and not is_loopback_host(host):
        fail(field, f"may use plain http:// only for a loopback address: {shown}")
    netloc = f"[{host}]" if ":" in host else host
    return f"{scheme}://{netloc}" + (f":{port}" if port is not None else "")
