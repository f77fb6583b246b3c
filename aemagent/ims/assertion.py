"""The signed JWT a service credential sends to /ims/exchange/jwt.

The wire facts are in docs/IMS-WIRE.md, "JWT exchange".

The claims name the organisation (`iss`), the technical account (`sub`), the audience
`{ims_base}/c/{client_id}` and one `{ims_base}/s/{metascope}: true` claim per metascope; `exp`
and `iat` are integer Unix seconds. It is signed RS256 with the credential's private key, afresh
for every attempt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jwt

if TYPE_CHECKING:
    from aemagent.credentials import ServiceCredential

__all__ = ["build_jwt_claims", "sign_assertion"]


def build_jwt_claims(cred: ServiceCredential, *, now_wall: float, lifetime: int) -> dict[str, Any]:
    """The JWT's claims: integer `exp`/`iat`, and one `true` claim per metascope."""
    iat = int(now_wall)
    claims: dict[str, Any] = {
        "exp": iat + lifetime,
        "iat": iat,
        "iss": cred.org_id,
        "sub": cred.technical_account_id,
        "aud": f"{cred.ims_base}/c/{cred.client_id}",
    }
    for scope in cred.metascopes:
        claims[f"{cred.ims_base}/s/{scope}"] = True
    return claims


def sign_assertion(cred: ServiceCredential, *, now_wall: float, lifetime: int) -> str:
    """The JWT issued at `now_wall`, living `lifetime` seconds, signed with the credential's key."""
    claims = build_jwt_claims(cred, now_wall=now_wall, lifetime=lifetime)
    return jwt.encode(claims, cred.private_key, algorithm="RS256")
