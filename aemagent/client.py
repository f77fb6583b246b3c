"""Python callers: ask the running agent for a token. Standard library only.

    from aemagent.client import get_token

    token = get_token(url="https://author-p123-e456.adobeaemcloud.com/")
    urllib.request.Request(url, headers=token.headers())

Ask again for every request, or at least every few minutes, rather than keeping a token: the agent
answers from memory, quickly, and a long-running program then never holds a stale token.
`aemagent.httpx_auth.AemAgentAuth` does that for httpx.

Exceptions (part of aemagent.errors' tree, one line each, mirroring aem-token's exit codes):

    AgentError          base (errors.AgentError itself); also an answer this client does not
                        understand (exit 1)
      AgentNotRunning   no agent answers at the socket, or another user's process listens there:
                        nothing is sent to it (exit 2; an errors.AgentUnreachable)
      NoSuchProfile     no such profile, no profile matches the URL, or several do (exit 3)
      TokenUnavailable  the profile has no usable token now; IMS's words in the message (exit 4)
      BadRequest        the agent refused the request, e.g. min_valid too long (exit 64)
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass

from aemagent import errors, exits, paths, wire

__all__ = [
    "AgentError",
    "AgentNotRunning",
    "BadRequest",
    "NoSuchProfile",
    "Token",
    "TokenUnavailable",
    "force_refresh",
    "get_token",
]

# As aem-token: a stale socket refuses at once; the agent caps its own wait on IMS at ~20 s.
CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 30.0


AgentError = errors.AgentError


class AgentNotRunning(errors.AgentUnreachable):
    """No agent answers at the socket, or another user's process listens there; the message says
    what to do about it."""

    @classmethod
    def from_unreachable(cls, exc: errors.AgentUnreachable) -> "AgentNotRunning":
        new = cls(exc.path, exc.reason, permission=exc.permission)
        new.args = (f"{exc}; {exc.advice}",)
        return new


class NoSuchProfile(AgentError):
    code = "not_found"
    status = 404
    exit_code = exits.NO_PROFILE


class TokenUnavailable(AgentError):
    code = "unavailable"
    status = 503
    exit_code = exits.NO_TOKEN


class BadRequest(AgentError):
    code = "bad_request"
    status = 400
    exit_code = exits.USAGE


# An error answer's class, by the exit code its HTTP status maps to.
_BY_EXIT: dict[int, type[AgentError]] = {
    cls.exit_code: cls for cls in (NoSuchProfile, TokenUnavailable, BadRequest)
}


@dataclass(frozen=True, repr=False)
class Token:
    """One access token as the agent served it. Its repr never shows the token."""

    access_token: str
    expires_at: int  # unix seconds
    expires_in: int  # seconds left when the agent answered
    profile: str
    client_id: str | None = None
    org_id: str | None = None
    account: str | None = None  # the technical account of a service credential
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a secret

    def headers(self) -> dict[str, str]:
        """What AEM's and Cloud Manager's APIs need: Authorization, and the client and org."""
        headers = {"Authorization": f"Bearer {self.access_token}"}
        if self.client_id:
            headers["x-api-key"] = self.client_id
        if self.org_id:
            headers["x-gw-ims-org-id"] = self.org_id
        return headers

    def fingerprint(self) -> str:
        """The SHA-256 of the token in hex: what `force_refresh` sends, safe to log."""
        return hashlib.sha256(self.access_token.encode()).hexdigest()

    def __repr__(self) -> str:
        return (
            f"Token(profile={self.profile!r}, expires_at={self.expires_at}, "
            f"access_token=<{len(self.access_token)} chars>)"
        )


def get_token(
    profile: str | None = None,
    url: str | None = None,
    min_valid: float | None = None,
    *,
    socket: str | None = None,
) -> Token:
    """The current token of `profile`, else of the profile whose hosts match `url`.

    With neither, `$AEMAGENT_PROFILE`, else the agent's default profile (as aem-token). With
    `min_valid`, the token stays valid at least that many more seconds (the agent refreshes first
    if needed). `socket` defaults to `$AEMAGENT_SOCK`, else the per-user path.
    """
    if profile is not None and url is not None:
        raise ValueError("give profile or url, not both")
    params: list[tuple[str, str]] = []
    if profile is not None:
        params.append(("profile", profile))
    elif url is not None:
        params.append(("url", url))
    elif env_profile := os.environ.get("AEMAGENT_PROFILE"):
        params.append(("profile", env_profile))
    if min_valid is not None:
        if isinstance(min_valid, bool) or not (math.isfinite(min_valid) and min_valid >= 0):
            raise ValueError(f"min_valid must be a number of seconds >= 0, not {min_valid!r}")
        params.append(
            ("min_valid", repr(float(min_valid)) if min_valid % 1 else str(int(min_valid)))
        )
    query = "&".join(f"{name}={wire.quote(value)}" for name, value in params)
    info = _call(socket, "GET", "/v1/token" + (f"?{query}" if query else ""))
    return _token(info)


def force_refresh(
    token: Token | str, *, profile: str | None = None, socket: str | None = None
) -> bool:
    """Ask for a new token because `token` was refused (a 401); True if the agent fetched one.

    The agent refreshes only if `token` is still the profile's current one and it has not forced a
    refresh in the last minute, so many callers that saw the same 401 cause one refresh, and a
    token the API refuses for another reason cannot make the agent hammer IMS. It never lifts a
    block after IMS refused the credential itself. False means: nothing was fetched; ask
    `get_token` again (another caller may have refreshed already).
    """
    if isinstance(token, Token):
        profile = profile or token.profile
        value = token.access_token
    else:
        value = token
    if not profile:
        raise ValueError("force_refresh needs the profile when given a bare token")
    digest = hashlib.sha256(value.encode()).hexdigest()
    body = json.dumps({"if_current": digest}).encode()
    info = _call(socket, "POST", f"/v1/profiles/{wire.quote(profile)}/refresh", body)
    refreshed = info.get("refreshed")
    if not isinstance(refreshed, bool):
        raise AgentError(
            "the agent's refresh answer has no 'refreshed'; is it an older aemagent version?"
        )
    return refreshed


def _call(
    socket: str | None, method: str, target: str, body: bytes | None = None
) -> dict[str, object]:
    headers = [("Accept", "application/json")]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        reply = wire.request(
            paths.socket_path(socket),
            method,
            target,
            body=body,
            headers=headers,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
    except wire.AgentUnreachable as exc:
        raise AgentNotRunning.from_unreachable(exc) from None
    except wire.WireError as exc:
        raise AgentError(str(exc)) from None
    try:
        info = reply.json()
    except wire.WireError:
        info = None
    if reply.status != 200:
        message = info.get("message") if isinstance(info, dict) else None
        if not (isinstance(message, str) and message.strip()):
            message = f"unexpected HTTP {reply.status} answer from the agent"
        raise _BY_EXIT.get(exits.for_status(reply.status), AgentError)(_one_line(message))
    if not isinstance(info, dict):
        raise AgentError("the agent's answer is not a JSON object")
    return info


def _token(info: dict[str, object]) -> Token:
    access_token = info.get("access_token")
    profile = info.get("profile")
    expires_at = info.get("expires_at")
    expires_in = info.get("expires_in")
    if not (isinstance(access_token, str) and access_token and access_token.isprintable()):
        raise AgentError("the agent's answer has no valid access_token")
    if not (isinstance(profile, str) and profile):
        raise AgentError("the agent's answer has no profile")
    numbers = (expires_at, expires_in)
    if any(isinstance(n, bool) or not isinstance(n, int | float) for n in numbers):
        raise AgentError("the agent's answer has no valid expires_at and expires_in")
    assert isinstance(expires_at, int | float)
    assert isinstance(expires_in, int | float)
    return Token(
        access_token=access_token,
        expires_at=int(expires_at),
        expires_in=int(expires_in),
        profile=profile,
        client_id=_opt_str(info, "client_id"),
        org_id=_opt_str(info, "org_id"),
        account=_opt_str(info, "account"),
    )


def _opt_str(info: dict[str, object], key: str) -> str | None:
    value = info.get(key)
    return value if isinstance(value, str) and value else None


def _one_line(text: str, limit: int = 1000) -> str:
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
