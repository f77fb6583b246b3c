"""The one exception tree of aemagent.

    AemAgentError              base; str() is one line for a user, never a secret    exit  HTTP
    ├── UsageError             the caller asked for something impossible             64   400
    ├── CredentialError        a credential cannot be parsed; names the field        64   400
    ├── ConfigError            the config file is wrong; names file and key          64   400
    ├── SocketDirError         the socket directory is unsafe or unusable             1   500
    ├── NotFoundError          no such profile / no profile matches                   3   404
    ├── AmbiguousError         several profiles match; names them                     3   409
    ├── UnavailableError       no usable token now; says why                          4   503
    ├── IMSError               IMS answered with an error, or could not be reached    4   503
    │   ├── IMSTransientError  5xx, 429, timeouts, connection errors: retried with backoff
    │   └── IMSPermanentError  the credential is wrong: no automatic retries
    │       └── ClockSkewError the JWT expired on IMS's clock even after a corrected retry
    ├── AgentError             asking the agent failed (aem-token, CLI, client)       1   502
    │   ├── AgentUnreachable   no agent answers at the socket path                    2
    │   │   ├── UntrustedPeer  another user's process listens there: nothing sent     2
    │   │   └── client.AgentNotRunning   what aemagent.client raises for either       2
    │   ├── WireError          not a complete, well-formed HTTP answer in time        1
    │   ├── UnexpectedAnswer   well-formed HTTP, but content this client cannot use   1
    │   ├── client.NoSuchProfile     an error answer of the agent, by its status      3   404
    │   ├── client.TokenUnavailable                                                   4   503
    │   └── client.BadRequest                                                        64   400
    ├── CommandError           a command fails with the exit code it carries         (given)
    │   └── LaunchError        starting the daemon in the background failed
    ├── AlreadyRunning         another live agent serves the socket path              1
    │                          (`aemagent serve` exits 0 on it: not starting another is no failure)
    └── emulator.demo.DemoError  the demo failed                                      1

The HTTP column is `status`, with `code` its name in the socket API's error answers (400
bad_request, 404 not_found, 409 ambiguous, 503 unavailable, 500 internal); `exit_code` is what a
command exits with. aemagent.exits names the exit codes and holds the one map from an answer's
HTTP status to an exit code (tests check the classes agree with it). Library errors (httpx,
cryptography, jwt) are translated at the boundary with `raise ... from`.

aem-token imports this module on its hot path (wire raises the agent-talking errors): it imports
nothing, and the exit codes are written here as numbers rather than imported from aemagent.exits.
"""


class AemAgentError(Exception):
    """Base of every error aemagent raises on purpose."""

    code = "internal"
    status = 500
    exit_code = 1

    def __init__(self, message: str) -> None:
        # One line, always: a message is shown on a terminal and in one log line.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(AemAgentError):
    code = "bad_request"
    status = 400
    exit_code = 64


class CredentialError(AemAgentError):
    """A credential is malformed. The message names the field, never its value."""

    code = "bad_request"
    status = 400
    exit_code = 64

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(AemAgentError):
    code = "bad_request"
    status = 400
    exit_code = 64


class SocketDirError(AemAgentError):
    """The socket's directory is owned by someone else, open to others, or not a directory."""


class NotFoundError(AemAgentError):
    code = "not_found"
    status = 404
    exit_code = 3


class AmbiguousError(AemAgentError):
    code = "ambiguous"
    status = 409
    exit_code = 3


class UnavailableError(AemAgentError):
    code = "unavailable"
    status = 503
    exit_code = 4


class IMSError(AemAgentError):
    """IMS refused a request or could not be reached.

    Carries what IMS said (`error`, `error_description`, the `X-Debug-Id` header) and a hint for
    the user. `transient` says whether retrying later may help.
    """

    code = "unavailable"
    status = 503
    exit_code = 4
    transient = True

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error: str | None = None,
        description: str | None = None,
        debug_id: str | None = None,
        hint: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.summary = " ".join(message.split())
        self.http_status = http_status
        self.error = error
        self.description = description
        self.debug_id = debug_id
        self.hint = hint
        self.retry_after = retry_after
        parts = [self.summary]
        if error or description:
            said = ": ".join(p for p in (error, description) if p)
            parts.append(f"IMS said {said}")
        if debug_id:
            parts.append(f"X-Debug-Id {debug_id}")
        text = "; ".join(parts)
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class IMSTransientError(IMSError):
    transient = True


class IMSPermanentError(IMSError):
    transient = False


class ClockSkewError(IMSPermanentError):
    pass


# --- talking to the agent (raised by aemagent.wire and the agent's clients) ---------------------


class AgentError(AemAgentError):
    """Something went wrong asking the agent; `str()` is one line for a human.

    Also an answer a client does not understand. `aemagent.client.AgentError` is this class.
    """

    code = "agent_error"
    status = 502


class AgentUnreachable(AgentError):
    """No agent answers at `path`: missing file, stale socket, not a socket, permission denied,
    path too long, connect timeout. `reason` says why, in a few words."""

    code = "no_agent"
    exit_code = 2

    def __init__(self, path: str, reason: str, *, permission: bool = False) -> None:
        # The path verbatim (not whitespace-collapsed): it is what the user must look for.
        Exception.__init__(self, f"no agent at {path} ({reason})")
        self.path = path
        self.reason = reason
        # Permission denied: someone else's socket, so "start one" is not the fix.
        self.permission = permission

    @property
    def advice(self) -> str:
        """What to do about it, for the one line every client prints."""
        if self.permission:
            return "point $AEMAGENT_SOCK or --socket at your own agent"
        return "start it with `aemagent start`"


class UntrustedPeer(AgentUnreachable):
    """The process listening at `path` runs as `peer_uid`, neither us nor root (or we cannot tell
    who it is: `peer_uid` None). Whoever made the path first can listen there, e.g. another user
    who created `/tmp/aemagent-<our uid>/` before we did; so we check before sending a byte."""

    def __init__(self, path: str, message: str, peer_uid: int | None = None) -> None:
        super().__init__(path, message, permission=True)
        self.args = (message,)
        self.peer_uid = peer_uid


class WireError(AgentError):
    """The agent's answer was malformed, truncated, too large, or did not come in time."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)  # verbatim, as AgentUnreachable; callers one-line it


class UnexpectedAnswer(AgentError):
    """The agent answered with well-formed HTTP this client does not understand (a 200 without
    a valid token, say): usually a different aemagent version."""


# --- commands -----------------------------------------------------------------------------------


class CommandError(AemAgentError):
    """A command fails: one line on stderr, and `exit_code` (an aemagent.exits code)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class LaunchError(CommandError):
    """Starting the daemon in the background failed; names the path or log file involved."""


class AlreadyRunning(AemAgentError):
    """Another live daemon holds the lock for this socket path, or something else listens there."""

    def __init__(self, path: str, pid: int | None, *, who: str | None = None) -> None:
        self.path, self.pid = path, pid
        who = who or (f"an agent (pid {pid})" if pid else "an agent (another process)")
        super().__init__(f"{who} already serves {path}")
