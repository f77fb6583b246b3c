"""The one exception tree of aemagent.

    AemAgentError                 str() is one line fit for a user; never a secret or a token
    ├── UsageError                the caller asked for something impossible       400 bad_request
    ├── CredentialError           a credential could not be parsed; names the field 400 bad_request
    ├── ConfigError               the config file is wrong; names file and key     400 bad_request
    ├── SocketDirError            the socket directory is unsafe or unusable
    ├── NotFoundError             no such profile / no profile matches            404 not_found
    ├── AmbiguousError            several profiles match; names them              409 ambiguous
    ├── UnavailableError          no usable token now; says why                   503 unavailable
    └── IMSError                  IMS answered with an error, or could not be reached
        ├── IMSTransientError     5xx, 429, timeouts, connection errors: retried with backoff
        └── IMSPermanentError     the credential is wrong: no automatic retries
            └── ClockSkewError    the JWT expired on IMS's clock even after a corrected retry

`code` and `status` are what the socket API answers for an error of that class.
Library errors (httpx, cryptography, jwt) are translated at the boundary with `raise ... from`.
"""

from __future__ import annotations


class AemAgentError(Exception):
    """Base of every error aemagent raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        # One line, always: a message is shown on a terminal and in one log line.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class UsageError(AemAgentError):
    code = "bad_request"
    status = 400


class CredentialError(AemAgentError):
    """A credential is malformed. The message names the field, never its value."""

    code = "bad_request"
    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ConfigError(AemAgentError):
    code = "bad_request"
    status = 400


class SocketDirError(AemAgentError):
    """The socket's directory is owned by someone else, open to others, or not a directory."""


class NotFoundError(AemAgentError):
    code = "not_found"
    status = 404


class AmbiguousError(AemAgentError):
    code = "ambiguous"
    status = 409


class UnavailableError(AemAgentError):
    code = "unavailable"
    status = 503


class IMSError(AemAgentError):
    """IMS refused a request or could not be reached.

    Carries what IMS said (`error`, `error_description`, the `X-Debug-Id` header) and a hint for
    the user. `transient` says whether retrying later may help.
    """

    code = "unavailable"
    status = 503
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
