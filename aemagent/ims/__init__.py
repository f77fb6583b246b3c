"""The IMS layer: the one place that talks to Adobe IMS (docs/IMS-WIRE.md has the wire facts).

* `client`    IMSClient: the httpx clients (proxies, CA, timeouts), the capped raw read,
              redirects refused; the JWT exchange with its clock-skew retry, client
              credentials, revocation.
* `answers`   what an answer means: a Grant and its lifetime (units, caps, `created_at`), or
              an error of errors.py with IMS's words redacted and a hint.
* `assertion` the JWT claims and signature of the service-credential exchange.
"""

from aemagent.ims.answers import (
    LIFETIME_CAP,
    error_from_response,
    parse_retry_after,
    token_lifetime,
)
from aemagent.ims.assertion import build_jwt_claims
from aemagent.ims.client import MAX_ANSWER, IMSClient

__all__ = [
    "LIFETIME_CAP",
    "MAX_ANSWER",
    "IMSClient",
    "build_jwt_claims",
    "error_from_response",
    "parse_retry_after",
    "token_lifetime",
]
