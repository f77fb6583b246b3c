"""`aem-token`: print a fresh access token from the running agent.

It runs inside `$(aem-token)` in every script, so it must start fast (LESSONS.md row 4): the
plain-token path (`--format token` and `header`) imports only `_socket` and this package's
`paths` and `wire` on top of what the interpreter loads anyway. No argparse, no json, no re: the
arguments are parsed by hand. The agent's JSON answers (`--format json|headers|env`, errors) are
decoded by `wire.flat_json` and encoded by `_json_dumps`, so `json` (7.5 ms with the `re` and
`enum` it imports) is loaded only for an answer outside that simple shape. A test enforces this
(tests/test_helper.py, STYLE.md practice 8).

On success only the requested output goes to stdout, in one write; on failure nothing goes to
stdout and one line goes to stderr (STYLE.md practice 9). Exit codes are CONTRACT.md's.
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
                                  "profile","client_id"?,"org_id"?} on one line
                       env       export AEM_ACCESS_TOKEN='<token>'
  --min-valid SECONDS  the token served stays valid at least this long (default 60,
                       at most a quarter of the token's lifetime)
  --socket PATH        the agent's socket (default $AEMAGENT_SOCK, else the per-user path)
  -h, --help           show this help and exit
  --version            show the version and exit

Prefer `aem-token --format header | curl -H @- URL` over `curl -H "...$(aem-token)"`:
a token on a command line is visible to other local users while curl runs.

exit status: 0 ok; 1 unexpected answer; 2 no agent answers (start it with `aemagent start`);
3 no such profile, or several match; 4 no usable token now; 64 usage error
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
# What `--format json` prints, in this order; the last two only when the agent sent them.
_JSON_FIELDS = ("access_token", "token_type", "expires_at", "expires_in", "profile")
_JSON_OPTIONAL = ("client_id", "org_id")


class _UsageError(Exception):
    pass


class _BadAnswer(Exception):
    """The agent answered 200 with something this helper does not understand."""


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line and no traceback
        return _fail(EXIT_UNEXPECTED, f"internal error: {type(exc).__name__}: {exc}")


def git_credential(action: str, args: list[str]) -> int:
    """git's credential-helper protocol (`aem-token get|store|erase`): NOT IMPLEMENTED YET.

    Planned (CONTRACT.md, "git mode"): `get` reads git's attributes from stdin and answers
    username, password and password_expiry_utc for a host that matches a profile; `erase` asks
    for a fresh token next time; `store` is a no-op.
    """
    del args
    return _fail(EXIT_USAGE, f"git credential mode ({action}) is not available yet")


def _run(argv: list[str]) -> int:
    if argv and argv[0] in _GIT_ACTIONS:
        return git_credential(argv[0], argv[1:])
    try:
        opts = _parse(argv)
    except _UsageError as exc:
        return _fail(EXIT_USAGE, f"{exc}; see `aem-token --help`")
    if "help" in opts:
        return _write(USAGE)
    if "version" in opts:
        from aemagent import __version__

        return _write(f"aem-token {__version__}\n")
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
        if exc.permission:
            return _fail(
                EXIT_NO_AGENT, f"{exc}; point $AEMAGENT_SOCK or --socket at your own agent"
            )
        return _fail(EXIT_NO_AGENT, f"{exc}; start it with `aemagent start`")
    except wire.WireError as exc:
        return _fail(EXIT_UNEXPECTED, str(exc))
    if reply.status != 200:
        return _error_answer(reply)
    try:
        if plain:
            token = _plain_token(reply)
            return _write(f"{token}\n" if fmt == "token" else f"Authorization: Bearer {token}\n")
        return _write(_format_json_answer(fmt, _json_answer(reply)))
    except _BadAnswer as exc:
        return _fail(EXIT_UNEXPECTED, f"{exc}; is the agent a different aemagent version?")


def _parse(argv: list[str]) -> dict[str, str]:
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
    return opts


def _target(opts: dict[str, str]) -> str:
    """The request target; only the parameters given, the profile choice already made."""
    params: list[tuple[str, str]] = []
    if "profile" in opts:
        params.append(("profile", opts["profile"]))
    elif "url" in opts:
        params.append(("url", opts["url"]))
    elif profile := os.environ.get("AEMAGENT_PROFILE"):
        params.append(("profile", profile))
    if "min_valid" in opts:
        params.append(("min_valid", opts["min_valid"]))
    query = "&".join(f"{name}={wire.quote(value)}" for name, value in params)
    return f"/v1/token?{query}" if query else "/v1/token"


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
        lines += [f"{names[key]}: {_one_line(str(value))}" for key, value in extra]
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


def _error_answer(reply: wire.Reply) -> int:
    """A non-200 answer: the agent's one-line message, with CONTRACT.md's exit code."""
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
        )
    code = {400: EXIT_USAGE, 404: EXIT_NO_PROFILE, 409: EXIT_NO_PROFILE, 503: EXIT_NO_TOKEN}
    return _fail(code.get(reply.status, EXIT_UNEXPECTED), _one_line(message))


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


def _fail(code: int, message: str) -> int:
    """One line on stderr; nothing on stdout."""
    line = "aem-token: " + _one_line(message, limit=2000) + "\n"
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:  # stderr is closed too: the exit code is all that is left
        return code
    return code


if __name__ == "__main__":
    sys.exit(main())
