"""git's credential-helper protocol: `git-credential-aemagent` and `aem-token get|store|erase`.

`git config credential.helper aemagent` runs `git-credential-aemagent [OPTIONS] ACTION`, with git's
attributes as key=value lines on stdin up to a blank line. What git does with a helper, checked
against real git (tests/integration/test_git.py): it shows the helper's stderr to the user, ignores
its exit status, and USES whatever it printed on stdout even when it exits non-zero; so on any
failure stdout stays empty. A host we do not serve gets no output and exit 0, so git asks the next
helper. When no agent answers, we cannot tell whether the host is ours: we stay quiet (exit 0)
unless the host is an AEM as a Cloud Service host (`*.adobeaemcloud.com`) or the helper was pinned
to a profile with `--profile`; then one line says to start the agent.

Like aem-token, whose option parser, answer checks and output this shares (aemagent.helper), the
`get` path needs no `json`, `re` or third-party code.
"""

import os
import sys

from aemagent import exits, paths, wire
from aemagent.errors import CommandError, UnexpectedAnswer, UsageError
from aemagent.helper import (
    CONNECT_TIMEOUT,
    DIFFERENT_VERSION,
    READ_TIMEOUT,
    error_answer,
    fail,
    guarded,
    is_token,
    json_answer,
    parse_options,
    unreachable_hint,
    write,
)

GIT_PROG = "git-credential-aemagent"
GIT_USAGE = """\
usage: git-credential-aemagent [--socket PATH] [--profile NAME] [--min-valid SECONDS]
                               get|store|erase

git's credential helper for aemagent: `git config credential.helper aemagent`.
get    answers an https host that matches a profile's host patterns with
       username (the technical account, else "aem"), password (the access token)
       and password_expiry_utc; prints nothing for other hosts
erase  asks the agent for a fresh token next time, if the rejected one is still
       current and none was forced in the last minute; never deletes a credential
store  does nothing: the agent already holds the credential

--profile pins one profile whatever the host: use it only in a helper scoped to
one URL (credential.https://HOST.helper), or git sends that token to every host.
"""

# git's attributes are a few short lines; anything near this is not git talking to us.
MAX_GIT_INPUT = 64 * 1024
# Host names git may hand us (with an optional :port, or an [IPv6] literal). Anything else is not
# a host we would match, and must not reach the agent's URL parser in a shape that could make it
# see a different host than git will connect to (a backslash, an "@", a "/").
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")
# Hosts where a missing agent is worth a line on stderr even from an unscoped helper.
_AEM_HOST_SUFFIX = ".adobeaemcloud.com"


class _Done(CommandError):
    """git mode is finished early with this exit code (any message is already on stderr)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__("", exit_code)


def git_main(argv: list[str] | None = None) -> int:
    """`git-credential-aemagent`: git runs it as `git-credential-aemagent [OPTIONS] ACTION`."""
    return guarded(_run_git, sys.argv[1:] if argv is None else argv, GIT_PROG)


def _run_git(argv: list[str]) -> int:
    try:
        opts = parse_options(argv, git=True)
    except UsageError as exc:
        return fail(exits.USAGE, f"{exc}; see `{GIT_PROG} --help`", GIT_PROG)
    if not opts.keys() & {"help", "version", "git"}:
        return fail(
            exits.USAGE,
            f"an action is needed: get, store or erase; see `{GIT_PROG} --help`",
            GIT_PROG,
        )
    if "help" in opts:
        return write(GIT_USAGE)
    if "version" in opts:
        from aemagent import __version__

        return write(f"{GIT_PROG} {__version__}\n")
    return git_credential(opts["git"], opts, GIT_PROG)


def git_credential(action: str, opts: dict[str, str], prog: str = "aem-token") -> int:
    """One git credential-helper call: git's attributes on stdin, ours on stdout."""
    try:
        attrs = read_git_attributes()
    except UsageError as exc:
        # `store` and actions we do not know are no-ops: no reason to complain about their input.
        return fail(exits.USAGE, str(exc), prog) if action in ("get", "erase") else exits.OK
    # git's rule: a helper silently ignores an action it does not support.
    host = _https_host(attrs) if action in ("get", "erase") else None
    if host is None:  # `store`, another action, not https or no host: not ours
        return exits.OK
    try:
        if action == "get":
            return _git_get(opts, host, attrs.get("path", ""), prog)
        return _git_erase(opts, host, attrs.get("path", ""), attrs.get("password", ""), prog)
    except _Done as done:
        return done.exit_code
    except UnexpectedAnswer as exc:
        return fail(exits.UNEXPECTED, f"{exc}; {DIFFERENT_VERSION}", prog)


def read_git_attributes(fd: int = 0) -> dict[str, str]:
    """git's `key=value` lines from `fd`, up to a blank line or EOF; `UsageError` if too long."""
    data = b""
    while not (data.startswith((b"\n", b"\r\n")) or b"\n\n" in data or b"\n\r\n" in data):
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # stdin closed or not readable: nothing was sent
            break
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_GIT_INPUT:
            raise UsageError(f"git's input is longer than {MAX_GIT_INPUT // 1024} KiB")
    return parse_git_attributes(data)


def parse_git_attributes(data: bytes) -> dict[str, str]:
    """Lines before the first blank one; `\\r` tolerated; a line without `=` ignored.

    `url=` stands for its parts, replacing any given before it, as in git's own reader.
    Values keep undecodable bytes as surrogates, so a password hashes to the bytes git sent.
    """
    attrs: dict[str, str] = {}
    for raw in data.decode("utf-8", "surrogateescape").split("\n"):
        line = raw.removesuffix("\r")
        if not line:
            break
        key, eq, value = line.partition("=")
        if not eq or not key:
            continue
        if key == "url":
            for part in ("protocol", "host", "path", "username", "password"):
                attrs.pop(part, None)
            attrs.update(_split_url(value))
        else:
            attrs[key] = value
    return attrs


def _split_url(url: str) -> dict[str, str]:
    """`scheme://[user[:pass]@]host[:port][/path]` into git's attribute names; no `re`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return {}
    authority, _, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    parts = {"protocol": scheme.lower(), "host": host}
    if path:
        parts["path"] = path
    if at:
        parts["username"] = userinfo.partition(":")[0]
    return parts


def _https_host(attrs: dict[str, str]) -> str | None:
    """git's host (with any port) if this is an https request for a plausible host name."""
    host = attrs.get("host", "")
    if attrs.get("protocol") != "https" or not host or len(host) > 300:
        return None
    return host if _HOST_CHARS.issuperset(host) else None


def _git_url_query(opts: dict[str, str], host: str, path: str) -> str:
    """The token query: the pinned profile, else the URL git is about to call.

    Never `$AEMAGENT_PROFILE` or the agent's default profile: git asks for every https host it
    talks to, and a token must only go to a host the user tied to a profile.
    """
    if "profile" in opts:
        return "profile=" + wire.quote(opts["profile"])
    if len(path) > 2000:  # the agent matches the host only; a huge path would just be refused
        path = ""
    return "url=" + wire.quote(f"https://{host}/{path}")


def _git_get(opts: dict[str, str], host: str, path: str, prog: str) -> int:
    query = _git_url_query(opts, host, path)
    if "min_valid" in opts:
        query += "&min_valid=" + opts["min_valid"]
    reply = _git_request(opts, "GET", f"/v1/token?{query}", host, prog)
    info = json_answer(reply)
    expires_at = info.get("expires_at")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise UnexpectedAnswer("the agent's answer has no valid expires_at")
    account = info.get("account")
    username = account if isinstance(account, str) and is_token(account) else "aem"
    return write(
        f"username={username}\npassword={info['access_token']}\n"
        f"password_expiry_utc={int(expires_at)}\n"
    )


def _git_erase(opts: dict[str, str], host: str, path: str, password: str, prog: str) -> int:
    """Ask for a forced refresh, proving which token failed by its sha256; quiet on success."""
    if not password:  # nothing to prove: a forced refresh needs the token that failed
        return exits.OK
    profile = opts.get("profile")
    if profile is None:
        # Which profile serves this host; min_valid=0 so that this lookup never refreshes.
        query = _git_url_query(opts, host, path) + "&min_valid=0"
        info = json_answer(_git_request(opts, "GET", f"/v1/token?{query}", host, prog, quiet=True))
        name = info.get("profile")
        if not (isinstance(name, str) and name):
            raise UnexpectedAnswer("the agent's answer has no profile name")
        profile = name
    import hashlib  # only here: `erase` is rare and not on anyone's hot path

    digest = hashlib.sha256(password.encode("utf-8", "surrogateescape")).hexdigest()
    _git_request(
        opts,
        "POST",
        f"/v1/profiles/{wire.quote(profile)}/refresh",
        host,
        prog,
        body=f'{{"if_current":"{digest}"}}'.encode(),
        quiet=True,
    )
    return exits.OK


def _git_request(
    opts: dict[str, str],
    method: str,
    target: str,
    host: str,
    prog: str,
    *,
    body: bytes | None = None,
    quiet: bool = False,
) -> wire.Reply:
    """A 200 answer, else `_Done` with git's outcome (see the module docstring)."""
    headers = [("Accept", "application/json")]
    if body is not None:
        headers.append(("Content-Type", "application/json"))
    try:
        reply = wire.request(
            paths.socket_path(opts.get("socket")),
            method,
            target,
            body=body,
            headers=headers,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
    except wire.AgentUnreachable as exc:
        pinned = "profile" in opts
        if quiet or not (pinned or host.partition(":")[0].lower().endswith(_AEM_HOST_SUFFIX)):
            raise _Done(exits.OK) from None
        raise _Done(fail(exits.NO_AGENT, unreachable_hint(exc), prog)) from None
    except wire.WireError as exc:
        raise _Done(fail(exits.UNEXPECTED, str(exc), prog)) from None
    if reply.status == 404 and (quiet or "profile" not in opts):
        raise _Done(exits.OK)  # no profile for this host (or it was just forgotten): not ours
    if reply.status != 200:
        raise _Done(error_answer(reply, prog))
    return reply
