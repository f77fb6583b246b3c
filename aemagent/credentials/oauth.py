"""OAuth server-to-server credentials: a client id, a secret and scopes (docs/IMS-WIRE.md).

There is no one download format, so three spellings are read:

    ours            {"client_id", "client_secret", "scopes": [...] or "a,b", "org_id"?,
                     "ims_endpoint"?}
    Adobe Developer Console's "Download JSON"
                    {"CLIENT_ID", "CLIENT_SECRETS": [...], "SCOPES", "ORG_ID",
                     "TECHNICAL_ACCOUNT_ID", "TECHNICAL_ACCOUNT_EMAIL"}
    aio's config    {"client_id", "client_secret"?, "client_secrets": [...], "scopes",
                     "ims_org_id" or "org_id", "technical_account_id", "technical_account_email"}

For each field the first spelling present wins, in the order of `_KEYS`; a single
`client_secret` wins over a `client_secrets` list (aio's own docs show files with both), and of a
list the first secret is used. Keys aemagent does not read (`oauth_enabled`, ...) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from aemagent.credentials.fields import (
    DEFAULT_IMS_BASE,
    Secret,
    canonical_digest,
    fail,
    ims_base_from_endpoint,
    scope_list,
    text_field,
    text_value,
    token_field,
)

__all__ = ["OAUTH_KEYS", "OAuthCredential", "parse_oauth"]

# Logical field -> the keys that spell it, first match wins.
_KEYS: dict[str, tuple[str, ...]] = {
    "client_id": ("client_id", "CLIENT_ID"),
    "client_secret": ("client_secret", "CLIENT_SECRET", "client_secrets", "CLIENT_SECRETS"),
    "scopes": ("scopes", "SCOPES"),
    "org_id": ("org_id", "ORG_ID", "ims_org_id", "IMS_ORG_ID"),
    "technical_account_id": ("technical_account_id", "TECHNICAL_ACCOUNT_ID"),
    "technical_account_email": ("technical_account_email", "TECHNICAL_ACCOUNT_EMAIL"),
    "ims_endpoint": ("ims_endpoint", "IMS_ENDPOINT"),
}
# Any of these marks an object as OAuth server-to-server credentials (kind detection).
OAUTH_KEYS = frozenset(_KEYS["client_id"] + _KEYS["client_secret"])


@dataclass(frozen=True, repr=False, eq=False)
class OAuthCredential:
    """OAuth server-to-server credentials, exchanged by client_credentials at /ims/token/v3."""

    kind: ClassVar[str] = "oauth"
    refreshable: ClassVar[bool] = True  # IMS gives a new token whenever asked
    certificate_expires_at: ClassVar[float | None] = None  # no certificate, only a secret
    client_id: str
    client_secret: Secret
    scopes: tuple[str, ...]
    org_id: str | None = None
    ims_base: str = DEFAULT_IMS_BASE
    technical_account_id: str | None = None
    technical_account_email: str | None = None
    # Left empty, it is computed from the other fields (so hand-built credentials get one too).
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", _oauth_digest(self))

    def __repr__(self) -> str:
        return (
            f"OAuthCredential(client_id={self.client_id!r}, org_id={self.org_id!r}, "
            f"ims_base={self.ims_base!r}, scopes={self.scopes!r})"
        )

    def default_name(self) -> str:
        """`oauth-` and the first 8 characters of the client id, lowercased and sanitized."""
        start = re.sub(r"[^a-z0-9._-]+", "-", self.client_id[:8].lower()).strip("-._")
        return f"oauth-{start}" if start else "oauth"

    def derived_hosts(self) -> tuple[str, ...]:
        # An OAuth client id says nothing about which AEM environments it may call.
        return ()


def _oauth_digest(cred: OAuthCredential) -> str:
    return canonical_digest(
        {
            "kind": cred.kind,
            "client_id": cred.client_id,
            "client_secret": cred.client_secret.reveal(),
            "scopes": list(cred.scopes),
            "org_id": cred.org_id,
            "ims_base": cred.ims_base,
            "technical_account_id": cred.technical_account_id,
            "technical_account_email": cred.technical_account_email,
        }
    )


def _key(obj: Mapping[Any, Any], field: str) -> str | None:
    """The key that spells `field` in `obj`, or None when no spelling is present (or null)."""
    return next((k for k in _KEYS[field] if obj.get(k) is not None), None)


def _primary(obj: Mapping[Any, Any], field: str) -> str:
    """The spelling to name in a "missing" complaint: Adobe's upper case if the file uses it."""
    upper = any(isinstance(k, str) and k.isupper() for k in obj)
    if field == "client_secret":
        return "CLIENT_SECRETS" if upper else "client_secret"
    return field.upper() if upper else field


def _optional_id(obj: Mapping[Any, Any], field: str) -> str | None:
    key = _key(obj, field)
    return None if key is None else token_field(obj, key, "")


def _secret(obj: Mapping[Any, Any]) -> Secret:
    key = _key(obj, "client_secret")
    if key is None:
        fail(_primary(obj, "client_secret"), "is missing")
    value = obj[key]
    if isinstance(value, list):  # CLIENT_SECRETS, client_secrets: the first one is used
        if not value:
            fail(key, "lists no secret (an empty array)")
        return Secret(text_value(value[0], f"{key}[0]", secret=True).strip())
    return Secret(text_value(value, key, secret=True).strip())


def parse_oauth(obj: Mapping[Any, Any]) -> OAuthCredential:
    """Read any of the three spellings; raise CredentialError naming the first bad field."""
    id_key = _key(obj, "client_id") or _primary(obj, "client_id")
    client_id = token_field(obj, id_key, "")
    secret = _secret(obj)
    scopes_key = _key(obj, "scopes")
    if scopes_key is None:
        fail(_primary(obj, "scopes"), "is missing")
    scopes = scope_list(obj[scopes_key], scopes_key, noun="scope")
    endpoint_key = _key(obj, "ims_endpoint")
    ims_base = DEFAULT_IMS_BASE
    if endpoint_key is not None:
        ims_base = ims_base_from_endpoint(text_field(obj, endpoint_key, ""), field=endpoint_key)
    return OAuthCredential(
        client_id=client_id,
        client_secret=secret,
        scopes=scopes,
        org_id=_optional_id(obj, "org_id"),
        ims_base=ims_base,
        technical_account_id=_optional_id(obj, "technical_account_id"),
        technical_account_email=_optional_id(obj, "technical_account_email"),
    )
