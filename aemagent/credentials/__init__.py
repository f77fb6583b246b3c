"""Credentials: parse what users download into frozen objects whose secrets never show themselves.

Three kinds, each in its own module: AEM service credentials (`credentials.service`), OAuth
server-to-server credentials (`credentials.oauth`) and local development tokens
(`credentials.devtoken`). `parse_credential` first detects the kind, then hands the input to that
kind's parser. Every complaint is one `CredentialError` line that names the field by its JSON
path; for a secret field (client secret, private key, token) it gives the type and length, never
the value, not even partly.

`Credential` names what every kind has: all the agent reads. Only service credentials need
`cryptography`; their module is imported when one is parsed (or `ServiceCredential` is first
asked of this package), so importing this package, as the agent's core does, does not load it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aemagent.credentials.devtoken import (
    DevToken,
    looks_like_token,
    parse_dev_token,
    parse_dev_token_json,
)
from aemagent.credentials.fields import (
    DEFAULT_IMS_BASE,
    Secret,
    describe,
    fail,
    ims_base_from_endpoint,
    is_loopback_host,
)
from aemagent.credentials.oauth import OAUTH_KEYS, OAuthCredential, parse_oauth
from aemagent.errors import CredentialError

if TYPE_CHECKING:
    from aemagent.credentials.service import ServiceCredential

__all__ = [
    "DEFAULT_IMS_BASE",
    "Credential",
    "CredentialError",
    "DevToken",
    "OAuthCredential",
    "Secret",
    "ServiceCredential",
    "ims_base_from_endpoint",
    "is_loopback_host",
    "parse_credential",
]


class Credential(Protocol):
    """What every kind of credential has (read-only): `ServiceCredential`, `OAuthCredential`,
    `DevToken`, or a test's fake."""

    @property
    def kind(self) -> str:
        """ "service", "oauth" or "devtoken"."""

    @property
    def refreshable(self) -> bool:
        """True if IMS gives a new token whenever asked; a development token is not."""

    @property
    def client_id(self) -> str: ...

    @property
    def org_id(self) -> str | None: ...

    @property
    def technical_account_id(self) -> str | None: ...

    @property
    def certificate_expires_at(self) -> float | None:
        """Unix seconds; None if the credential has no certificate, or did not say."""

    @property
    def digest(self) -> str:
        """Equal for two credentials with all the same fields, secrets included."""

    def default_name(self) -> str:
        """The profile name used when none is given."""

    def derived_hosts(self) -> tuple[str, ...]:
        """Host patterns the credential itself implies (`*-p1-e2.adobeaemcloud.com`), or ()."""


def __getattr__(name: str) -> Any:
    # `ServiceCredential` is re-exported lazily: importing it loads cryptography.
    if name == "ServiceCredential":
        from aemagent.credentials.service import ServiceCredential

        return ServiceCredential
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- kind detection -------------------------------------------------------------------------------

# Any of these at the top of an object marks it as service credentials without their
# "integration" wrapper.
_SERVICE_KEYS = frozenset({"technicalAccount", "imsEndpoint", "metascopes", "privateKey"})
_UNDERSTOOD = (
    'expected AEM service credentials (an object with "integration"), '
    'OAuth server-to-server credentials (an object with "client_id" and "client_secret", '
    'or "CLIENT_ID" and "CLIENT_SECRETS" as the Adobe Developer Console downloads them) '
    'or a local development token (an object with "accessToken", or the bare token)'
)


def parse_credential(raw: bytes | str | Mapping[str, Any]) -> Credential:
    """Parse any credential aemagent understands; raise CredentialError naming what is wrong.

    `raw` is JSON text (bytes or str), an already parsed JSON object, or a bare token.
    """
    if isinstance(raw, bytes):
        raw = _decode(raw)
    if isinstance(raw, str):
        text = raw.removeprefix("\ufeff")
        if looks_like_token(text):  # never valid JSON, so no JSON could be mistaken for one
            return parse_dev_token(text)
        obj = _load_json(text)
        if isinstance(obj, str) and looks_like_token(obj):  # a token as a JSON string
            return parse_dev_token(obj)
    else:
        obj = raw
    if not isinstance(obj, Mapping):
        raise CredentialError(
            f"credential must be a JSON object or a bare token, got {describe(obj, secret=True)}"
        )
    return _parse_object(obj)


def _parse_object(obj: Mapping[Any, Any]) -> Credential:
    """Detect the kind of a JSON object and parse it as that kind."""
    # AEM's own sample code tells a development token's file from service credentials by
    # `accessToken`, which only the former has.
    if "accessToken" in obj:
        return parse_dev_token_json(obj)
    if "integration" in obj:
        integration = obj["integration"]
        if not isinstance(integration, Mapping):
            fail("integration", f"must be an object, got {describe(integration, secret=True)}")
        return _parse_service(integration, "integration.")
    if _SERVICE_KEYS & obj.keys():
        return _parse_service(obj, "")
    if OAUTH_KEYS & obj.keys():
        return parse_oauth(obj)
    if obj.get("ok") is False:
        status = obj.get("statusCode")
        code = f" (statusCode {status})" if isinstance(status, int) else ""
        raise CredentialError(
            f"this is an error answer from the AEM Developer Console{code}, not a credential; "
            "download it again"
        )
    raise CredentialError(f"not a credential aemagent understands: {_UNDERSTOOD}")


def _parse_service(body: Mapping[Any, Any], prefix: str) -> Credential:
    from aemagent.credentials.service import parse_service

    return parse_service(body, prefix)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CredentialError(
            f"credential is not UTF-8 text (bad byte at offset {exc.start})"
        ) from None


def _load_json(text: str) -> Any:
    if not text.strip():
        raise CredentialError("credential is empty")
    try:
        return json.loads(text)
    # The messages are built from the error's position, never from the input text.
    except json.JSONDecodeError as exc:
        if exc.msg == "Expecting value" and not text[: exc.pos].strip():
            raise CredentialError(
                "credential is neither JSON nor a bare access token "
                "(three base64url parts separated by dots)"
            ) from None
        raise CredentialError(
            f"credential is not valid JSON: {exc.msg.removesuffix(' at')} at line {exc.lineno}"
            f" column {exc.colno}"
        ) from None
    except RecursionError:
        raise CredentialError("credential is not valid JSON: nested too deeply") from None
    except ValueError:  # e.g. an integer with more digits than Python converts
        raise CredentialError("credential is not valid JSON: a number is too long") from None
