"""httpx authentication from the running agent.

    import httpx
    from aemagent.httpx_auth import AemAgentAuth

    with httpx.Client(auth=AemAgentAuth()) as http:  # the profile is chosen by the host
        http.get("https://author-p123-e456.adobeaemcloud.com/content/x.json")

Every request asks the agent for the current token (cheap: one local socket round trip), so a
program that runs for days never sends a stale one. On a 401 it forces ONE refresh, proving which
token failed by its SHA-256 (the agent refreshes only if that is still the current token and it has
not forced one in the last minute), then retries once if the agent now has a different token;
otherwise the 401 is returned as it is.

The request body is read before sending (`requires_request_body`) so that the retry can resend
it; a streamed upload is therefore held in memory.

The agent is asked with blocking standard-library socket calls (`aemagent.client`). In the async
flow they run in a worker thread through anyio (which httpx itself depends on; it works under
asyncio and trio), so a refresh that takes seconds does not stall the event loop. Without anyio
they would block the loop for that long.

The agent's errors propagate as `aemagent.client` exceptions (`NoSuchProfile` when no profile
matches the URL's host: nothing is sent to a host the agent does not know; `AgentNotRunning` when
no agent of ours answers, including a socket served by another user, to which nothing is sent).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from typing import TypeVar

import httpx

from aemagent import client

__all__ = ["AemAgentAuth"]

_T = TypeVar("_T")
_R = TypeVar("_R")


class AemAgentAuth(httpx.Auth):
    """Sets Authorization (and x-api-key, x-gw-ims-org-id) from the agent on every request.

    `profile` pins one profile. Without it, `url_match=True` picks the profile whose host
    patterns match each request's host (the agent answers `NoSuchProfile` when none or several
    do); `url_match=False` uses `$AEMAGENT_PROFILE`, else the agent's default profile.
    `min_valid` (seconds) makes the agent serve a token that lasts at least that long.
    `socket` defaults to `$AEMAGENT_SOCK`, else the per-user path.
    """

    requires_request_body = True

    def __init__(
        self,
        profile: str | None = None,
        url_match: bool = True,
        min_valid: float | None = None,
        socket: str | None = None,
    ) -> None:
        self.profile = profile
        self.url_match = url_match
        self.min_valid = min_valid
        self.socket = socket

    def __repr__(self) -> str:
        return (
            f"AemAgentAuth(profile={self.profile!r}, url_match={self.url_match!r}, "
            f"min_valid={self.min_valid!r}, socket={self.socket!r})"
        )

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._token(request)
        _apply(request, token)
        response = yield request
        if response.status_code == 401:
            fresh = self._after_401(token)
            if fresh is not None:
                _apply(request, fresh)
                yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await _in_thread(self._token, request)
        _apply(request, token)
        response = yield request
        if response.status_code == 401:
            fresh = await _in_thread(self._after_401, token)
            if fresh is not None:
                _apply(request, fresh)
                yield request

    def _token(self, request: httpx.Request) -> client.Token:
        if self.profile is not None:
            return client.get_token(self.profile, min_valid=self.min_valid, socket=self.socket)
        if self.url_match:
            # Only scheme, host and port: the agent matches the host, and a query may be secret.
            url = f"{request.url.scheme}://{request.url.netloc.decode('ascii')}/"
            return client.get_token(url=url, min_valid=self.min_valid, socket=self.socket)
        return client.get_token(min_valid=self.min_valid, socket=self.socket)

    def _after_401(self, used: client.Token) -> client.Token | None:
        """A different token to retry with, or None. Any other caller's refresh counts too."""
        client.force_refresh(used, socket=self.socket)
        fresh = client.get_token(used.profile, min_valid=self.min_valid, socket=self.socket)
        return None if fresh.access_token == used.access_token else fresh


def _apply(request: httpx.Request, token: client.Token) -> None:
    """Authorization always; the client and org headers unless the caller set them."""
    for name, value in token.headers().items():
        if name == "Authorization" or name not in request.headers:
            request.headers[name] = value


async def _in_thread(fn: Callable[[_T], _R], arg: _T) -> _R:
    try:
        import anyio.to_thread
    except ImportError:  # pragma: no cover - httpx depends on anyio
        return fn(arg)
    return await anyio.to_thread.run_sync(fn, arg)
