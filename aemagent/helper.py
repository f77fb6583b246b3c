"""`aem-token`: print a fresh access token from the running agent.

It runs inside `$(aem-token)` in every script, so it must start fast: the plain-token path
(`--format token` and `header`) imports only `_socket` and this package's `paths`, `wire` and
`errors` on top of what the interpreter loads anyway. No argparse, no json, no re: the arguments are
parsed by hand. The agent's JSON answers (`--format json|headers|env`, errors) are decoded by
`wire.flat_json` and encoded by `_json_dumps`, so `json` (expensive to import, with the `re` and
`enum` it pulls in) is loaded only for an answer outside that simple shape.
tests/unit/test_helper.py checks what each path imports. The commands are the two-line scripts in
bin/, which the wheel ships as they are: the console-script wrapper older pips write imports `re`
(tests/unit/test_helper_scripts.py, bench/startup.py).

On success only the requested output goes to stdout, in one write, and the exit code is 0; on
failure nothing goes to stdout, one line goes to stderr, and the exit code is one of
aemagent.exits (imported on failure only): 1 unexpected, 2 no agent, 3 no such profile or several
match, 4 no usable token, 64 usage.

`aem-token get|store|erase` speaks git's credential-helper protocol: aemagent.gitcred, which
shares this module's option parser, answer checks and output.
"""

import os
import sys

from aemagent import paths, wire
from aemagent.errors import UnexpectedAnswer, UsageError

TYPE_CHECKING = False  # what typing.TYPE_CHECKING is, without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable

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
_JSON_OPTIONAL = ("client_id", "org_id", "account")


def main(argv: list[str] | None = None) -> int:
    """`aem-token`."""
    return guarded(_run, sys.argv[1:] if argv is None else argv, "aem-token")


def guarded(run: "Callable[[list[str]], int]", argv: list[str], prog: str) -> int:
    """`run(argv)`'s exit code; a bug or Ctrl-C still ends in one line and no traceback."""
    try:
        return run(argv)
    except KeyboardInterrupt:
        from aemagent import exits

        return exits.INTERRUPTED
    except Exception as exc:  # a bug: still one line and no traceback
        from aemagent import exits

        return fail(exits.UNEXPECTED, f"internal error: {type(exc).__name__}: {exc}", prog)


def _run(argv: list[str]) -> int:
    try:
        opts = parse_options(argv)
    except UsageError as exc:
        return fail(exc.exit_code, f"{exc}; see `aem-token --help`")
    if "help" in opts:
        return write(USAGE)
    if "version" in opts:
        from aemagent import __version__

        return write(f"aem-token {__version__}\n")
    if "git" in opts:
        from aemagent.gitcred import git_credential

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
        return fail(exc.exit_code, unreachable_hint(exc))
    except wire.WireError as exc:
        return fail(exc.exit_code, str(exc))
    if reply.status != 200:
        chosen = opts.keys() & {"profile", "url"}
        return error_answer(reply, env_profile=None if chosen else _env_profile())
    try:
        if plain:
            token = _plain_token(reply)
            return write(f"{token}\n" if fmt == "token" else f"Authorization: Bearer {token}\n")
        return write(format_json_answer(fmt, json_answer(reply)))
    except UnexpectedAnswer as exc:
        return fail(exc.exit_code, f"{exc}; {DIFFERENT_VERSION}")


DIFFERENT_VERSION = "is the agent a different aemagent version?"


def unreachable_hint(exc: wire.AgentUnreachable) -> str:
    return f"{exc}; {exc.advice}"


def parse_options(argv: list[str], *, git: bool = False) -> dict[str, str]:
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
            raise UsageError(
                f"unknown option {arg!r}" if arg.startswith("-") else f"unexpected argument {arg!r}"
            )
        if not eq:
            value = next(args, "")
        if not value:
            raise UsageError(f"{name} needs a value")
        opts[key] = value  # a repeated option: the last one wins
    if opts.get("format", "token") not in _FORMATS:
        raise UsageError(f"--format must be one of {', '.join(_FORMATS)}, not {opts['format']!r}")
    min_valid = opts.get("min_valid")
    if min_valid is not None:
        if not (min_valid.isascii() and min_valid.isdigit() and len(min_valid) <= 10):
            raise UsageError(f"--min-valid needs a whole number of seconds, not {min_valid!r}")
        opts["min_valid"] = str(int(min_valid))
    if "git" in opts and ("format" in opts or "url" in opts):
        raise UsageError(f"--format and --url do not apply to git's {opts['git']!r}")
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


# --- answers -----------------------------------------------------------------------------------


def _plain_token(reply: wire.Reply) -> str:
    body = reply.body
    if body.startswith(b"{"):  # an agent that ignored `Accept: text/plain`
        token = json_answer(reply)["access_token"]
        assert isinstance(token, str)  # checked by json_answer
        return token
    if body.endswith(b"\n"):  # tolerate one trailing newline
        body = body[:-1]
    token = body.decode("ascii", "replace")
    if not is_token(token):
        raise UnexpectedAnswer(f"the agent's answer is not a token ({len(reply.body)} bytes)")
    return token


def is_token(token: str) -> bool:
    """Non-empty printable ASCII without spaces or quotes: safe on one line and in a header."""
    return bool(token) and token.isascii() and token.isprintable() and not _UNSAFE & set(token)


_UNSAFE = frozenset(" \"'\\")


def json_answer(reply: wire.Reply) -> dict[str, object]:
    try:
        info = reply.json()
    except wire.WireError as exc:
        raise UnexpectedAnswer(str(exc)) from None
    if not isinstance(info, dict):
        raise UnexpectedAnswer("the agent's answer is not a JSON object")
    token = info.get("access_token")
    if not (isinstance(token, str) and is_token(token)):
        raise UnexpectedAnswer("the agent's answer has no valid access_token")
    return info


def format_json_answer(fmt: str, info: dict[str, object]) -> str:
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
            raise UnexpectedAnswer(f"the agent's answer has no valid {key}")
        out[key] = value
    out.update(extra)
    return _json_dumps(out) + "\n"


def _json_dumps(obj: dict[str, object]) -> str:
    """Compact JSON; by hand for plain strings and integers, so `json` stays unloaded."""
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


def error_answer(reply: wire.Reply, prog: str = "aem-token", env_profile: str | None = None) -> int:
    """A non-200 answer: the agent's one-line message, with the exit code for its HTTP status.

    `env_profile`: the profile name we sent came from $AEMAGENT_PROFILE, so a 404 says so.
    """
    from aemagent import exits

    try:
        info = reply.json()
    except wire.WireError:
        info = None
    message = info.get("message") if isinstance(info, dict) else None
    if not (isinstance(message, str) and message.strip()):
        return fail(
            exits.UNEXPECTED,
            f"unexpected HTTP {reply.status} answer from the agent, without an error message; "
            + DIFFERENT_VERSION,
            prog,
        )
    if env_profile is not None and reply.status == 404:
        message = _from_env(message, env_profile)
    return fail(exits.for_status(reply.status), _one_line(message), prog)


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


def write(text: str) -> int:
    """All of `text` to stdout in one write; exit code 0 (exits.OK, not imported on success).

    A reader that went away is not worth a message."""
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(1, data) :]
    except OSError as exc:
        from aemagent import exits

        if isinstance(exc, BrokenPipeError):
            return exits.UNEXPECTED
        return fail(exits.UNEXPECTED, f"cannot write to stdout: {exc.strerror or exc}")
    return 0


def fail(code: int, message: str, prog: str = "aem-token") -> int:
    """One line on stderr; nothing on stdout."""
    line = f"{prog}: " + _one_line(message, limit=2000) + "\n"
    try:
        os.write(2, line.encode("utf-8", "backslashreplace"))
    except OSError:  # stderr is closed too: the exit code is all that is left
        return code
    return code


if __name__ == "__main__":
    sys.exit(main())
