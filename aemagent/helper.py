"""`aem-token`: print a fresh access token from the running agent.

It runs inside `$(aem-token)` in every script, so it must start fast (LESSONS.md row 4): the
plain-token path (`--format token` and `header`) imports only `_socket` and this package's
`paths` and `wire` on top of what the interpreter loads anyway. No argparse, no json, no re: the
arguments are parsed by hand. The agent's JSON answers (`--format json|headers|env`, errors) are
decoded by `wire.flat_json` and encoded by `_json_dumps`, so `json` (7.5 ms with the `re` and
`enum` it imports) is loaded only for an answer outside that simple shape. A test enforces this
(tests/test_helper.py, STYLE.md practice 8). The commands are the two-line scripts in bin/, which
the wheel ships as they are: the console-script wrapper older pips write imports `re` (5 to 10 ms;
tests/test_helper_scripts.py, bench/startup.py).

On success only the requested output goes to stdout, in one write; on failure nothing goes to
stdout and one line goes to stderr (STYLE.md practice 9). Exit codes are CONTRACT.md's.

git mode (`aem-token get|store|erase`, and the `git-credential-aemagent` script that
`git config credential.helper aemagent` runs) speaks git's credential-helper protocol: key=value
lines on stdin up to a blank line. What git does with a helper, checked against real git
(tests/test_git.py): it shows the helper's stderr to the user, ignores its exit status, and USES
whatever it printed on stdout even when it exits non-zero; so on any failure stdout stays empty.
A host we do not serve gets no output and exit 0, so git asks the next helper. When no agent
answers, we cannot tell whether the host is ours: we stay quiet (exit 0) unless the host is an
AEM as a Cloud Service host (`*.adobeaemcloud.com`) or the helper was pinned to a profile with
`--profile`; then one line says to start the agent. The `get` path needs no `json` either.
"""

import os
import sys

from aemagent import paths, wire

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_NO_AGENT = 2
EXIT_NO_PROFILE = 3
EXIT_NO_TOKEN = 4
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130

# A stale socket refuses at once; this only bounds an agent too busy to accept.
CONNECT_TIMEOUT = 1.0
# The agent caps its own wait on IMS at about 20 s and then answers 503.
READ_TIMEOUT = 30.0

USAGE = """\
usage: aem-token [--profile NAME | --url URL] [--format FORMAT] [--min-valid SECONDS]
                 [--socket PATH]

Print a fresh Adobe IMS access token held by the running aemagent.

options:
  -p, --profile NAME   the profile to use (else --url, else $AEMAGENT_PROFILE,
                       else the agent's default profile)
  --url URL            use the profile whose host patterns match URL
  --format FORMAT      token     the token alone (default)
                       header    Authorization: Bearer <token>
                       headers   every header the profile's APIs need, one per line
                       json      {"access_token","token_type","expires_at","expires_in",
                                  "profile","client_id"?,"org_id"?,"account"?}
                                 on one line
                       env       export AEM_ACCESS_TOKEN='<token>'
  --min-valid SECONDS  the token served stays valid at least this long (default 60,
                       at most a quarter of the token's lifetime)
  --socket PATH        the agent's socket (default $AEMAGENT_SOCK, else the per-user path)
  -h, --help           show this help and exit
  --version            show the version and exit

Prefer `aem-token --format header | curl -H @- URL` over `curl -H "...$(aem-token)"`:
a token on a command line is visible to other local users while curl runs.

git credential helper mode (see docs/CALLERS.md):
  aem-token [--socket PATH] [--profile NAME] [--min-valid SECONDS] get|store|erase

exit status: 0 ok; 1 unexpected answer; 2 no agent answers (start it with `aemagent start`);
3 no such profile, or several match; 4 no usable token now; 64 usage error
"""

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

_OPTIONS = {
    "-p": "profile",
    "--profile": "profile",
    "--url": "url",
    "--format": "format",
    "--min-valid": "min_valid",
    "--socket": "socket",
}
_FORMATS = ("token", "header", "headers", "json", "env")
_GIT_ACTIONS = ("get", "store", "erase")
# git's attributes are a few short lines; anything near this is not git talking to us.
MAX_GIT_INPUT = 64 * 1024
# Host names git may hand us (with an optional :port, or an [IPv6] literal). Anything else is not
# a host we would match, and must not reach the agent's URL parser in a shape that could make it
# see a different host than git will connect to (a backslash, an "@", a "/").
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")
# Hosts where a missing agent is worth a line on stderr even from an unscoped helper.
_AEM_HOST_SUFFIX = ".adobeaemcloud.com"
# What `--format json` prints, in this order; the last two only when the agent sent them.
_JSON_FIELDS = ("access_token", "token_type", "expires_at", "expires_in", "profile")
_JSON_OPTIONAL = ("client_id", "org_id", "account")


class _UsageError(Exception):
    pass


class _BadAnswer(Exception):
    """The agent answered 200 with something this helper does not understand."""


class _Done(Exception):
    """git mode is finished early with this exit code (any message is already on stderr)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def main(argv: list[str] | None = None) -> int:
    """`aem-token`."""
    return _guarded(sys.argv[1:] if argv is None else argv, "aem-token")


def git_main(argv: list[str] | None = None) -> int:
    """`git-credential-aemagent`: git runs it as `git-credential-aemagent [OPTIONS] ACTION`."""
    return _guarded(sys.argv[1:] if argv is None else argv, GIT_PROG)


def _guarded(argv: list[str], prog: str) -> int:
    try:
        return _run_git(argv) if prog == GIT_PROG else _run(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line and no traceback
        return _fail(EXIT_UNEXPECTED, f"internal error: {type(exc).__name__}: {exc}", prog)


def _run(argv: list[str]) -> int:
    try:
        opts = _parse(argv)
    except _UsageError as exc:
        return _fail(EXIT_USAGE, f"{exc}; see `aem-token --help`")
    if "help" in opts:
        return _write(USAGE)
    if "version" in opts:
        from aemagent import __version__

        return _write(f"aem-token {__version__}\n")
    if "git" in opts:
        return git_credential(opts["git"], opts)
    fmt = opts.get("format", "token")
    plain = fmt in ("token", "header")
    sock = paths.socket_path(opts.get("socket"))
    try:
        reply = wire.request(
            sock,
            "GET",
            _target(opts),
            headers=(("Accept", "text/plain" if plain else "application/json"),),
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
    except wire.AgentUnreachable as exc:
        return _fail(EXIT_NO_AGENT, _unreachable_hint(exc))
    except wire.WireError as exc:
        return _fail(EXIT_UNEXPECTED, str(exc))
    if reply.status != 200:
        chosen = opts.keys() & {"profile", "url"}
        return _error_answer(reply, env_profile=None if chosen else _env_profile())
    try:
        if plain:
            token = _plain_token(reply)
            return _write(f"{token}\n" if fmt == "token" else f"Authorization: Bearer {token}\n")
        return _write(_format_json_answer(fmt, _json_answer(reply)))
    except _BadAnswer as exc:
        return _fail(EXIT_UNEXPECTED, f"{exc}; is the agent a different aemagent version?")


def _unreachable_hint(exc: wire.AgentUnreachable) -> str:
    return f"{exc}; {exc.advice}"


def _parse(argv: list[str], *, git: bool = False) -> dict[str, str]:
    """Options into a dict; a git action (any word for `git`, else get/store/erase) as "git"."""
    opts: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help", "--version"):
            return {"version" if arg == "--version" else "help": ""}
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg.startswith("-p") and len(arg) > 2:  # -pNAME
            name, eq, value = "-p", "=", arg[2:]
        key = _OPTIONS.get(name)
        if key is None:
            word = bool(arg) and not arg.startswith("-")
            if word and "git" not in opts and (git or arg in _GIT_ACTIONS):
                opts["git"] = arg
                continue
            raise _UsageError(
                f"unknown option {arg!r}" if arg.startswith("-") else f"unexpected argument {arg!r}"
            )
        if not eq:
            value = next(args, "")
        if not value:
            raise _UsageError(f"{name} needs a value")
        opts[key] = value  # a repeated option: the last one wins
    if opts.get("format", "token") not in _FORMATS:
        raise _UsageError(f"--format must be one of {', '.join(_FORMATS)}, not {opts['format']!r}")
    min_valid = opts.get("min_valid")
    if min_valid is not None:
        if not (min_valid.isascii() and min_valid.isdigit() and len(min_valid) <= 10):
            raise _UsageError(f"--min-valid needs a whole number of seconds, not {min_valid!r}")
        opts["min_valid"] = str(int(min_valid))
    if "git" in opts and ("format" in opts or "url" in opts):
        raise _UsageError(f"--format and --url do not apply to git's {opts['git']!r}")
    return opts


def _target(opts: dict[str, str]) -> str:
    """The request target; only the parameters given, the profile choice already made."""
    params: list[tuple[str, str]] = []
    if "profile" in opts:
        params.append(("profile", opts["profile"]))
    elif "url" in opts:
        params.append(("url", opts["url"]))
    elif profile := _env_profile():
        params.append(("profile", profile))
    if "min_valid" in opts:
        params.append(("min_valid", opts["min_valid"]))
    query = "&".join(f"{name}={wire.quote(value)}" for name, value in params)
    return f"/v1/token?{query}" if query else "/v1/token"


def _env_profile() -> str | None:
    return os.environ.get("AEMAGENT_PROFILE") or None


# --- git mode ----------------------------------------------------------------------------------


def _run_git(argv: list[str]) -> int:
    try:
        opts = _parse(argv, git=True)
    except _UsageError as exc:
        return _fail(EXIT_USAGE, f"{exc}; see `{GIT_PROG} --help`", GIT_PROG)
    if not opts.keys() & {"help", "version", "git"}:
        return _fail(
            EXIT_USAGE,
            f"an action is needed: get, store or erase; see `{GIT_PROG} --help`",
            GIT_PROG,
        )
    if "help" in opts:
        return _write(GIT_USAGE)
    if "version" in opts:
        from aemagent import __version__

        return _write(f"{GIT_PROG} {__version__}\n")
    return git_credential(opts["git"], opts, GIT_PROG)


def git_credential(action: str, opts: dict[str, str], prog: str = "aem-token") -> int:
    """One git credential-helper call: git's attributes on stdin, ours on stdout."""
    try:
        attrs = read_git_attributes()
    except _UsageError as exc:
        # `store` and actions we do not know are no-ops: no reason to complain about their input.
        return _fail(EXIT_USAGE, str(exc), prog) if action in ("get", "erase") else EXIT_OK
    # git's rule: a helper silently ignores an action it does not support.
    host = _https_host(attrs) if action in ("get", "erase") else None
    if host is None:  # `store`, another action, not https or no host: not ours
        return EXIT_OK
    try:
        if action == "get":
            return _git_get(opts, host, attrs.get("path", ""), prog)
        return _git_erase(opts, host, attrs.get("path", ""), attrs.get("password", ""), prog)
    except _Done as done:
        return done.code
    except _BadAnswer as exc:
        return _fail(EXIT_UNEXPECTED, f"{exc}; is the agent a different aemagent version?", prog)


def read_git_attributes(fd: int = 0) -> dict[str, str]:
    """git's `key=value` lines from `fd`, up to a blank line or EOF; `_UsageError` if too long."""
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
            raise _UsageError(f"git's input is longer than {MAX_GIT_INPUT // 1024} KiB")
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
    info = _json_answer(reply)
    expires_at = info.get("expires_at")
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise _BadAnswer("the agent's answer has no valid expires_at")
    account = info.get("account")
    username = account if isinstance(account, str) and _is_token(account) else "aem"
    return _write(
        f"username={username}\npassword={info['access_token']}\n"
        f"password_expiry_utc={int(expires_at)}\n"
    )


def _git_erase(opts: dict[str, str], host: str, path: str, password: str, prog: str) -> int:
    """Ask for a forced refresh, proving which token failed by its sha256; quiet on success."""
    if not password:  # nothing to prove: a forced refresh needs the token that failed
        return EXIT_OK
    profile = opts.get("profile")
    if profile is None:
        # Which profile serves this host; min_valid=0 so that this lookup never refreshes.
        query = _git_url_query(opts, host, path) + "&min_valid=0"
        info = _json_answer(_git_request(opts, "GET", f"/v1/token?{query}", host, prog, quiet=True))
        name = info.get("profile")
        if not (isinstance(name, str) and name):
            raise _BadAnswer("the agent's answer has no profile name")
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
    return EXIT_OK


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
            raise _Done(EXIT_OK) from None
        raise _Done(_fail(EXIT_NO_AGENT, _unreachable_hint(exc), prog)) from None
    except wire.WireError as exc:
        raise _Done(_fail(EXIT_UNEXPECTED, str(exc), prog)) from None
    if reply.status == 404 and (quiet or "profile" not in opts):
        raise _Done(EXIT_OK)  # no profile for this host (or it was just forgotten): not ours
    if reply.status != 200:
        raise _Done(_error_answer(reply, prog))
    return reply


# --- answers -----------------------------------------------------------------------------------


def _plain_token(reply: wire.Reply) -> str:
    body = reply.body
    if body.startswith(b"{"):  # an agent that ignored `Accept: text/plain`
        token = _json_answer(reply)["access_token"]
        assert isinstance(token, str)  # checked by _json_answer
        return token
    if body.endswith(b"\n"):  # tolerate one trailing newline
        body = body[:-1]
    token = body.decode("ascii", "replace")
    if not _is_token(token):
        raise _BadAnswer(f"the agent's answer is not a token ({len(reply.body)} bytes)")
    return token


def _is_token(token: str) -> bool:
    """Non-empty printable ASCII without spaces or quotes: safe on one line and in a header."""
    return bool(token) and token.isascii() and token.isprintable() and not _UNSAFE & set(token)


_UNSAFE = frozenset(" \"'\\")


def _json_answer(reply: wire.Reply) -> dict[str, object]:
    try:
        info = reply.json()
    except wire.WireError as exc:
        raise _BadAnswer(str(exc)) from None
    if not isinstance(info, dict):
        raise _BadAnswer("the agent's answer is not a JSON object")
    token = info.get("access_token")
    if not (isinstance(token, str) and _is_token(token)):
        raise _BadAnswer("the agent's answer has no valid access_token")
    return info


def _format_json_answer(fmt: str, info: dict[str, object]) -> str:
    token = info["access_token"]
    if fmt == "env":
        return f"export AEM_ACCESS_TOKEN={_sh_quote(str(token))}\n"
    extra = [(key, info[key]) for key in _JSON_OPTIONAL if isinstance(info.get(key), str)]
    extra = [(key, value) for key, value in extra if value]
    if fmt == "headers":
        names = {"client_id": "x-api-key", "org_id": "x-gw-ims-org-id"}
        lines = [f"Authorization: Bearer {token}"]
        lines += [f"{names[k]}: {_one_line(str(value))}" for k, value in extra if k in names]
        return "\n".join(lines) + "\n"
    out: dict[str, object] = {}
    for key in _JSON_FIELDS:
        value = info.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is None or (key.startswith("expires") and not number):
            raise _BadAnswer(f"the agent's answer has no valid {key}")
        out[key] = value
    out.update(extra)
    return _json_dumps(out) + "\n"


def _json_dumps(obj: dict[str, object]) -> str:
    """Compact JSON; by hand for plain strings and integers, so `json` (7.5 ms) stays unloaded."""
    items = []
    for key, value in obj.items():
        if isinstance(value, int) and not isinstance(value, bool):
            encoded = str(value)
        elif isinstance(value, str) and _is_plain(value):
            encoded = f'"{value}"'
        else:
            break
        if not _is_plain(key):
            break
        items.append(f'"{key}":{encoded}')
    else:
        return "{" + ",".join(items) + "}"
    import json

    return json.dumps(obj, separators=(",", ":"))


def _is_plain(s: str) -> bool:
    """Printable ASCII without `"` or `\\`: what JSON writes verbatim inside quotes."""
    return s.isascii() and s.isprintable() and '"' not in s and "\\" not in s


def _sh_quote(s: str) -> str:
    """POSIX shell single quotes: `'` becomes `'\\''`."""
    return "'" + s.replace("'", "'\\''") + "'"


def _error_answer(
    reply: wire.Reply, prog: str = "aem-token", env_profile: str | None = None
) -> int:
    """A non-200 answer: the agent's one-line message, with CONTRACT.md's exit code.

    `env_profile`: the profile name we sent came from $AEMAGENT_PROFILE, so a 404 says so.
    """
    try:
        info = reply.json()
    except wire.WireError:
        info = None
    message = info.get("message") if isinstance(info, dict) else None
    if not (isinstance(message, str) and message.strip()):
        return _fail(
            EXIT_UNEXPECTED,
            f"unexpected HTTP {reply.status} answer from the agent, without an error message; "
            "is it a different aemagent version?",
            prog,
        )
    code = {400: EXIT_USAGE, 404: EXIT_NO_PROFILE, 409: EXIT_NO_PROFILE, 503: EXIT_NO_TOKEN}
    if env_profile is not None and reply.status == 404:
        message = _from_env(message, env_profile)
    return _fail(code.get(reply.status, EXIT_UNEXPECTED), _one_line(message), prog)


def _from_env(message: str, name: str) -> str:
    """Say the name came from $AEMAGENT_PROFILE, and suggest a close one the agent listed.

    Only on this error path: difflib is not imported by a successful `aem-token`.
    """
    said = f"no profile named {name}"
    if message.startswith(said):
        message = f"{said} (from $AEMAGENT_PROFILE){message[len(said) :]}"
    else:
        message += " (the name came from $AEMAGENT_PROFILE)"
    _, listed, names = message.rpartition("; profiles: ")
    if listed and "did you mean" not in message:
        import difflib

        close = difflib.get_close_matches(name, [n.strip() for n in names.split(",")], n=1)
        if close:
            message += f"; did you mean {close[0]}?"
    return message


def _one_line(text: str, limit: int = 1000) -> str:
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _write(text: str) -> int:
    """All of `text` to stdout in one write; a reader that went away is not worth a message."""
    data = memoryview(text.encode())
    try:
        while data:
            data = data[os.write(1, data) :]
    except BrokenPipeError:
        return EXIT_UNEXPECTED
    except OSError as exc:
        return _fail(EXIT_UNEXPECTED, f"cannot write to stdout: {exc.strerror or exc}")
    return EXIT_OK


def _fail(code: int, message: str, prog: str = "aem-token") -> int:
    """One line on stderr; nothing on stdout."""
    line = f"{prog}: " + _one_line(message, limit=2000) + "\n"
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:  # stderr is closed too: the exit code is all that is left
        return code
    return code


if __name__ == "__main__":
    sys.exit(main())
