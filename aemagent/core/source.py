"""Where tokens come from, as the core sees it: a `TokenSource` that answers with `Grant`s.

The agent depends on this protocol, not on the IMS client: `aemagent.ims.IMSClient` implements it
for the real IMS, and tests pass a fake. Keeping it here is what lets `aemagent.core` load without
httpx, pyjwt or cryptography.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aemagent.core.clocks import Now
from aemagent.credentials.fields import Secret

if TYPE_CHECKING:
    from aemagent.credentials import Credential


@dataclass(frozen=True, repr=False)
class Grant:
    """One access token fetched from IMS."""

    access_token: Secret
    lifetime: float  # seconds: the token's own expires_in (ms), else the response's
    sent: Now  # both clocks, read just before the request was sent

    def __repr__(self) -> str:
        return f"Grant(lifetime={self.lifetime!r}, sent={self.sent!r})"


class TokenSource(Protocol):
    """Where tokens come from: `aemagent.ims.IMSClient`, or a fake in tests."""

    async def fetch(self, credential: Credential) -> Grant: ...

    async def revoke(self, credential: Credential, token: Secret) -> str: ...
