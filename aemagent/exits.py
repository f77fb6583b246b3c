"""The exit codes of every aemagent command, and the one map from an agent's answer to them.

aem-token, git-credential-aemagent, `aemagent` and aemagent.client all report the same failure
with the same code. Each class of aemagent.errors carries its own `exit_code` (written there as a
number, since aem-token loads errors on its hot path and this module only on failure); tests check
that they agree with `for_status`.
"""

OK = 0
UNEXPECTED = 1  # an unexpected answer, or a bug
NO_AGENT = 2  # no agent answers at the socket (start it with `aemagent start`)
NO_PROFILE = 3  # no such profile, no profile matches, or several do
NO_TOKEN = 4  # the profile has no usable token now
USAGE = 64  # a usage error (EX_USAGE), or a request the agent refused as bad
INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT

# The agent's error answers by HTTP status (aemagent.errors: 400 bad_request, 404 not_found,
# 409 ambiguous, 503 unavailable); any other status is UNEXPECTED.
BY_STATUS = {400: USAGE, 404: NO_PROFILE, 409: NO_PROFILE, 503: NO_TOKEN}


def for_status(status: int) -> int:
    """The exit code for an error answer of HTTP `status`."""
    return BY_STATUS.get(status, UNEXPECTED)
