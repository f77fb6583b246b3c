import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakeagent import Canned, FakeAgent, error, json_answer, short_socket_dir, token_answer
from hypothesis import given, settings
from hypothesis import strategies as st

from aemagent import helper, paths, wire

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"


@pytest.fixture
def sock_path():
    with short_socket_dir() as directory:
        yield directory + "/agent.sock"


@pytest.fixture
def agent(sock_path, monkeypatch):
    monkeypatch.delenv("AEMAGENT_PROFILE", raising=False)
    with FakeAgent(sock_path, token_answer(TOKEN)) as fake:
        yield fake


@pytest.fixture
def run(capfd):
    """Runs aem-token in-process; returns (exit code, stdout, stderr)."""

    def run(*args, sock=None):
        argv = list(args)
        if sock is not None:
            argv += ["--socket", sock]
        code = helper.main(argv)
        out, err = capfd.readouterr()
        if code != 0:
            assert out == "", "nothing on stdout on failure"
            assert err.count("\n") == 1, f"exactly one stderr line, got {err!r}"
            assert err.startswith("aem-token: ")
        else:
            assert err == ""
        return code, out, err

    return run


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--profile", "my prof"],
        ["--profile=my prof"],
        ["-p", "my prof"],
        ["-pmy prof"],
        ["--profile", "other", "--profile", "my prof"],  # the last one wins
        ["--profile", "my prof", "--url", "https://ignored"],  # --profile wins over --url
    ],
)
def test_profile_forms(agent, run, args):
    assert run(*args, sock=agent.path) == (0, TOKEN + "\n", "")
    assert agent.requests[0].target == "/v1/token?profile=my%20prof"


def test_url_is_percent_encoded(agent, run):
    run("--url", "https://author-p1-e2.adobeaemcloud.com/a?b=c&d", sock=agent.path)
    assert agent.requests[0].target == (
        "/v1/token?url=https%3A%2F%2Fauthor-p1-e2.adobeaemcloud.com%2Fa%3Fb%3Dc%26d"
    )


def test_min_valid_is_normalised(agent, run):
    run("--url=https://h", "--min-valid", "0300", sock=agent.path)
    assert agent.requests[0].target == "/v1/token?url=https%3A%2F%2Fh&min_valid=300"


def test_min_valid_zero(agent, run):
    run("--min-valid=0", sock=agent.path)
    assert agent.requests[0].target == "/v1/token?min_valid=0"


def test_no_choice_sends_no_parameters(agent, run):
    run(sock=agent.path)
    assert agent.requests[0].request_line == "GET /v1/token HTTP/1.1"


def test_profile_from_the_environment(agent, run, monkeypatch):
    monkeypatch.setenv("AEMAGENT_PROFILE", "envprof")
    run(sock=agent.path)
    run("--url", "u", sock=agent.path)
    run("-p", "flag", sock=agent.path)
    monkeypatch.setenv("AEMAGENT_PROFILE", "")
    run(sock=agent.path)
    targets = [request.target for request in agent.requests]
    assert targets == [
        "/v1/token?profile=envprof",
        "/v1/token?url=u",
        "/v1/token?profile=flag",
        "/v1/token",
    ]


def test_socket_from_the_environment(agent, run, monkeypatch):
    monkeypatch.setenv("AEMAGENT_SOCK", agent.path)
    assert run() == (0, TOKEN + "\n", "")
    monkeypatch.setenv("AEMAGENT_SOCK", agent.path + ".nothere")
    assert run("--socket", agent.path)[0] == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--format", "xml"],
        ["--format=Token"],
        ["--format"],
        ["--min-valid", "-1"],
        ["--min-valid", "1.5"],
        ["--min-valid", "1e3"],
        ["--min-valid", "abc"],
        ["--min-valid", "٣"],  # a digit, but not an ASCII one
        ["--min-valid", "12345678901"],
        ["--min-valid", ""],
        ["--profile"],
        ["--profile="],
        ["-p"],
        ["--url", ""],
        ["--socket", ""],
        ["--bogus"],
        ["--help=yes"],
        ["-x"],
        ["extra"],
        ["--", "x"],
        ["--profile", "a", "token"],
    ],
)
def test_usage_errors(agent, run, args):
    code, _, err = run(*args, sock=agent.path)
    assert code == 64
    assert "see `aem-token --help`" in err
    assert agent.requests == []


def test_usage_error_names_the_problem(run):
    assert run("--min-valid", "soon")[2] == (
        "aem-token: --min-valid needs a whole number of seconds, not 'soon'; "
        "see `aem-token --help`\n"
    )
    assert "unknown option '--bogus'" in run("--bogus")[2]
    assert "--profile needs a value" in run("--profile")[2]


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(run, flag):
    code, out, _ = run(flag, "--bogus")
    assert code == 0
    assert out == helper.USAGE
    assert out.startswith("usage: aem-token")
    assert all(len(line) <= 100 for line in out.splitlines())


def test_version(run):
    from aemagent import __version__

    assert run("--version") == (0, f"aem-token {__version__}\n", "")


# git mode (`aem-token get|store|erase`) is tested in tests/integration/test_git.py.


# --- formats -----------------------------------------------------------------------------------


def test_token(agent, run):
    assert run(sock=agent.path) == (0, TOKEN + "\n", "")
    assert agent.requests[0].header("accept") == "text/plain"


def test_header(agent, run):
    assert run("--format", "header", sock=agent.path) == (0, f"Authorization: Bearer {TOKEN}\n", "")
    assert agent.requests[0].header("accept") == "text/plain"


def test_headers_with_client_and_org(agent, run):
    agent.answer = token_answer(TOKEN, client_id="cm-p1-e2", org_id="ABC@AdobeOrg")
    code, out, _ = run("--format=headers", sock=agent.path)
    assert code == 0
    assert out == (
        f"Authorization: Bearer {TOKEN}\nx-api-key: cm-p1-e2\nx-gw-ims-org-id: ABC@AdobeOrg\n"
    )
    assert agent.requests[0].header("accept") == "application/json"


def test_headers_without_client_and_org(agent, run):
    agent.answer = token_answer(TOKEN, client_id=None, org_id="")
    assert run("--format=headers", sock=agent.path) == (0, f"Authorization: Bearer {TOKEN}\n", "")


def test_json(agent, run):
    agent.answer = token_answer(TOKEN, client_id="cm-p1-e2", unknown="dropped")
    code, out, _ = run("--format", "json", sock=agent.path)
    assert code == 0
    assert out == (
        f'{{"access_token":"{TOKEN}","token_type":"Bearer","expires_at":1900000000,'
        '"expires_in":86000,"profile":"p123-e1234","client_id":"cm-p1-e2"}\n'
    )
    assert agent.requests[0].header("accept") == "application/json"


def test_env(agent, run):
    assert run("--format", "env", sock=agent.path) == (
        0,
        f"export AEM_ACCESS_TOKEN='{TOKEN}'\n",
        "",
    )


def test_shell_quoting():
    nasty = "it's $x `y`"
    assert helper._sh_quote(nasty) == "'it'\\''s $x `y`'"
    out = subprocess.run(
        ["sh", "-c", f"printf %s {helper._sh_quote(nasty)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == "it's $x `y`"


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.text(), st.integers(), st.booleans(), st.none(), st.floats()),
        max_size=6,
    )
)
def test_json_dumps_agrees_with_json(obj):
    assert helper._json_dumps(obj) == json.dumps(obj, separators=(",", ":"))


def test_json_output_with_unusual_values_falls_back_to_json(agent, run):
    agent.answer = token_answer(TOKEN, profile='prof "é"', expires_in=1.5)
    code, out, _ = run("--format=json", sock=agent.path)
    assert code == 0
    assert json.loads(out)["profile"] == 'prof "é"'
    assert '"expires_in":1.5,' in out


def test_token_with_one_trailing_newline_is_accepted(agent, run):
    agent.answer = Canned(200, TOKEN.encode() + b"\n", "text/plain")
    assert run(sock=agent.path)[1] == TOKEN + "\n"


def test_agent_ignoring_accept_plain_still_works(agent, run):
    agent.answer = json_answer(200, {"access_token": TOKEN, "token_type": "Bearer"})
    assert run(sock=agent.path) == (0, TOKEN + "\n", "")


# --- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, "bad_request", 64),
        (404, "not_found", 3),
        (409, "ambiguous", 3),
        (503, "unavailable", 4),
        (403, "forbidden", 1),
        (413, "too_large", 1),
        (500, "internal", 1),
    ],
)
@pytest.mark.parametrize("fmt", ["token", "json"])
def test_error_answers(agent, run, status, code, expected, fmt):
    agent.answer = error(status, code, f"the daemon says {code}")
    assert run("--format", fmt, sock=agent.path) == (
        expected,
        "",
        f"aem-token: the daemon says {code}\n",
    )


def test_multi_line_error_message_becomes_one_line(agent, run):
    agent.answer = error(503, "unavailable", "IMS said:\ninvalid_client\r\n(X-Debug-Id: 1)\x1b[31m")
    code, _, err = run(sock=agent.path)
    assert code == 4
    assert err == "aem-token: IMS said: invalid_client  (X-Debug-Id: 1) [31m\n"


@pytest.mark.parametrize(
    "canned",
    [
        Canned(404, b"Not Found", "text/plain"),  # an older daemon or something else entirely
        Canned(503, b"<html>busy</html>", "text/html"),
        json_answer(404, {"error": "not_found"}),
        json_answer(404, {"error": "not_found", "message": ""}),
        json_answer(404, ["not", "an", "object"]),
        Canned(200, b""),
        Canned(200, b"\n"),
        Canned(200, b"line one\nline two"),
        Canned(200, b"tok en"),
        Canned(200, b"tok\x00en"),
        Canned(200, "tök".encode()),
        Canned(200, b"{not json"),
        json_answer(200, {"token": "x"}),
        json_answer(200, {"access_token": ""}),
        json_answer(200, {"access_token": "a b"}),
        Canned(raw=b"garbage\r\n\r\n"),
        Canned(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated"),
    ],
)
def test_answers_not_understood_exit_1(agent, run, canned):
    agent.answer = canned
    assert run(sock=agent.path)[0] == 1


def test_a_connection_closed_unanswered_is_exit_2_and_says_why(agent, run):
    """What another user's agent does to us: close without reading (peer uid check)."""
    agent.answer = Canned(raw=b"")
    result = run(sock=agent.path)
    assert result[0] == 2
    assert "serves only the user it runs as" in result[2]
    assert "aemagent start" not in result[2]


@pytest.mark.parametrize(
    "info",
    [
        {"access_token": TOKEN},
        {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 1, "profile": "p"},
        {
            "access_token": TOKEN,
            "token_type": "Bearer",
            "expires_at": "tomorrow",
            "expires_in": 1,
            "profile": "p",
        },
        {
            "access_token": TOKEN,
            "token_type": "Bearer",
            "expires_at": True,
            "expires_in": 1,
            "profile": "p",
        },
    ],
)
def test_json_without_expiry_exits_1(agent, run, info):
    agent.answer = json_answer(200, info)
    code, _, err = run("--format=json", sock=agent.path)
    assert code == 1
    assert "different aemagent version" in err


def test_non_json_answer_to_a_json_format_exits_1(agent, run):
    agent.answer = Canned(200, TOKEN.encode(), "text/plain")
    assert run("--format=headers", sock=agent.path)[0] == 1


def test_read_timeout_exits_1(agent, run, monkeypatch):
    monkeypatch.setattr(helper, "READ_TIMEOUT", 0.2)
    agent.answer = Canned(200, b"late", delay=10)
    code, _, err = run(sock=agent.path)
    assert code == 1
    assert err == "aem-token: no answer from the agent within 0.2 s\n"


def test_missing_agent_exits_2_at_once(run, sock_path):
    started = time.monotonic()
    code, _, err = run(sock=sock_path)
    assert time.monotonic() - started < 5
    assert code == 2
    assert err == (
        f"aem-token: no agent at {sock_path} (no such file); start it with `aemagent start`\n"
    )


def test_default_path_is_used_without_socket_or_environment(run, monkeypatch, sock_path):
    monkeypatch.delenv("AEMAGENT_SOCK", raising=False)
    monkeypatch.setattr(paths, "default_socket_path", lambda **_: sock_path)
    assert f"no agent at {sock_path} " in run()[2]


@pytest.mark.parametrize("listening", [False, True])
def test_stale_socket_exits_2_at_once(run, sock_path, listening):
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(sock_path)
        if listening:  # a daemon that died: the file stays, nobody listens
            stale.listen()
            stale.close()
        started = time.monotonic()
        code, _, err = run(sock=sock_path)
        assert time.monotonic() - started < 5
    assert code == 2
    assert "connection refused: a stale socket); start it with `aemagent start`" in err


def test_permission_denied_exits_2_with_its_own_hint(run, monkeypatch):
    def denied(path, *args, **kwargs):
        raise wire.AgentUnreachable(path, "permission denied", permission=True)

    monkeypatch.setattr(wire, "request", denied)
    code, _, err = run(sock="/x/agent.sock")
    assert code == 2
    assert err == (
        "aem-token: no agent at /x/agent.sock (permission denied); "
        "point $AEMAGENT_SOCK or --socket at your own agent\n"
    )


def test_keyboard_interrupt_exits_130_quietly(monkeypatch, capfd):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wire, "request", interrupted)
    assert helper.main(["--socket", "/x"]) == 130
    assert capfd.readouterr() == ("", "")


def test_internal_error_is_one_line_without_traceback(run, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("bug\nhere")

    monkeypatch.setattr(wire, "request", broken)
    assert run(sock="/x") == (1, "", "aem-token: internal error: RuntimeError: bug here\n")


# --- the process as scripts see it -------------------------------------------------------------


def clean_env():
    """The environment without coverage's start-up hook or an agent of the user's."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "AEMAGENT_"))}


def aem_token(*args, prelude="", **kwargs):
    """Runs the helper in a fresh interpreter, as the console script does."""
    code = f"import os, sys; {prelude}from aemagent.helper import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-I", "-c", code, *args], env=clean_env(), check=False, **kwargs
    )


def test_console_script(agent):
    script = Path(sys.executable).with_name("aem-token")
    if not script.exists():
        pytest.skip("aem-token is not installed next to the interpreter")
    result = subprocess.run(
        [script, "--socket", agent.path], capture_output=True, check=False, timeout=10
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, TOKEN.encode() + b"\n", b"")


def test_closed_pipe_exits_1_quietly(agent):
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = aem_token("--socket", agent.path, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (1, b"")


def test_closed_stdout_exits_1_with_one_line(agent):
    result = aem_token("--socket", agent.path, prelude="os.close(1); ", capture_output=True)
    assert result.returncode == 1
    assert result.stderr == b"aem-token: cannot write to stdout: Bad file descriptor\n"


# The import test: what aem-token loads on top of a bare interpreter. At most five aemagent
# modules (the package itself counted) on success; on failure, the exit codes too.
HOT_PATH_ALLOWED = {"aemagent", "aemagent.helper", "aemagent.paths", "aemagent.wire", "_socket"}
HOT_PATH_ALLOWED |= {"aemagent.errors"}  # wire raises its exceptions
HOT_PATH_ALLOWED |= {"errno"}  # built into the interpreter: no file to read
FAILURE_ALLOWED = HOT_PATH_ALLOWED | {"aemagent.exits"}
# `aem-token get`: git's protocol is a module of its own.
GIT_ALLOWED = FAILURE_ALLOWED | {"aemagent.gitcred"}
# Never, not even when an unusual answer makes the helper fall back to `json`.
FORBIDDEN = {
    "trio", "httpx", "jwt", "cryptography", "platformdirs", "logging", "typing", "dataclasses",
    "pathlib", "importlib.metadata", "socket", "selectors", "h11", "__future__", "argparse",
}  # fmt: skip
# Not for answers of the documented shape: `json` is expensive to import, with `re` and `enum`.
FORBIDDEN_ON_HOT_PATH = FORBIDDEN | {
    "json", "shlex", "urllib.parse", "re", "enum", "collections", "warnings", "functools",
}  # fmt: skip

IMPORT_PROBE = """\
import sys
before = set(sys.modules)
from aemagent.helper import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    out.write("\\n".join(sorted(set(sys.modules) - before)))
sys.exit(code)
"""


def loaded_modules(tmp_path, *args, stdin=b""):
    """Runs aem-token in a fresh interpreter; returns its result and the modules it loaded."""
    listing = tmp_path / "modules.txt"
    result = subprocess.run(
        [sys.executable, "-I", "-c", IMPORT_PROBE, str(listing), *args],
        env=clean_env(),
        input=stdin,
        capture_output=True,
        check=False,
        timeout=20,
    )
    new = set(listing.read_text().split())
    assert "aemagent.wire" in new or "--help" in args  # the probe really ran the helper
    return result, new


def assert_light(new, allowed=HOT_PATH_ALLOWED):
    assert new <= allowed, f"unexpected imports: {sorted(new - allowed)}"
    assert not new & FORBIDDEN_ON_HOT_PATH


@pytest.mark.parametrize(
    ("args", "stdout"),
    [
        ([], TOKEN + "\n"),
        (["--format", "header"], f"Authorization: Bearer {TOKEN}\n"),
        (["-p", "x y", "--url", "https://h/?q", "--min-valid=30"], TOKEN + "\n"),
    ],
)
def test_hot_path_imports_only_what_it_needs(agent, tmp_path, args, stdout):
    result, new = loaded_modules(tmp_path, "--socket", agent.path, *args)
    assert (result.returncode, result.stdout.decode(), result.stderr) == (0, stdout, b"")
    assert_light(new)


@pytest.mark.parametrize("fmt", ["json", "headers", "env"])
def test_json_formats_are_as_light(agent, tmp_path, fmt):
    agent.answer = token_answer(TOKEN, client_id="cm-p1-e2", org_id="A@AdobeOrg")
    result, new = loaded_modules(tmp_path, "--socket", agent.path, "--format", fmt)
    assert (result.returncode, result.stderr) == (0, b"")
    assert TOKEN in result.stdout.decode()
    assert_light(new)


@pytest.mark.parametrize(
    ("canned", "code"),
    [
        (error(404, "not_found", "no profile 'x'; known: a, b"), 3),
        (error(503, "unavailable", "IMS: invalid_client (X-Debug-Id: 4f2a)"), 4),
        (Canned(200, b""), 1),
    ],
)
def test_failures_are_as_light(agent, tmp_path, canned, code):
    agent.answer = canned
    result, new = loaded_modules(tmp_path, "--socket", agent.path)
    assert result.returncode == code
    assert_light(new, FAILURE_ALLOWED)


def test_no_agent_is_as_light(tmp_path, sock_path):
    result, new = loaded_modules(tmp_path, "--socket", sock_path)
    assert result.returncode == 2
    assert_light(new, FAILURE_ALLOWED)


def test_help_is_as_light(tmp_path):
    result, new = loaded_modules(tmp_path, "--help")
    assert result.returncode == 0
    assert_light(new)


def test_unusual_answers_fall_back_to_json_and_nothing_heavier(agent, tmp_path):
    agent.answer = error(409, "ambiguous", 'several profiles match: "a", "b"\u00e9')
    result, new = loaded_modules(tmp_path, "--socket", agent.path)
    assert result.returncode == 3
    assert result.stderr.decode() == 'aem-token: several profiles match: "a", "b"\u00e9\n'
    assert "json" in new
    assert not new & FORBIDDEN, f"forbidden imports: {sorted(new & FORBIDDEN)}"


@pytest.mark.parametrize(
    ("host", "stdout"),
    [
        ("author-p1-e2.adobeaemcloud.com", f"username=tech@techacct.adobe.com\npassword={TOKEN}\n"),
        ("github.com", ""),  # not ours: no answer, and no heavier imports either
    ],
)
def test_git_get_is_as_light(agent, tmp_path, host, stdout):
    from fakeagent import FakeProfile, FakeProfiles

    agent.answer = FakeProfiles(
        FakeProfile(
            "p1-e2",
            hosts=("*.adobeaemcloud.com",),
            token=TOKEN,
            account="tech@techacct.adobe.com",
            client_id="cm-p1-e2",
            org_id="A@AdobeOrg",
        )
    )
    stdin = f"protocol=https\nhost={host}\n\n".encode()
    result, new = loaded_modules(tmp_path, "--socket", agent.path, "get", stdin=stdin)
    assert (result.returncode, result.stderr) == (0, b"")
    if stdout:
        stdout += "password_expiry_utc=1900000000\n"
    assert result.stdout.decode() == stdout
    assert_light(new, GIT_ALLOWED)


def test_every_error_class_exits_as_its_http_status_says():
    """errors.py writes the exit codes as numbers (it is on the hot path); exits.py maps."""
    import inspect

    from aemagent import client, errors, exits

    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)]
    classes += [client.NoSuchProfile, client.TokenUnavailable, client.BadRequest]
    for cls in classes:
        assert issubclass(cls, errors.AemAgentError), cls
        if cls.status in exits.BY_STATUS:
            assert cls.exit_code == exits.for_status(cls.status), cls
    assert errors.AemAgentError.exit_code == exits.UNEXPECTED
    assert errors.AgentUnreachable.exit_code == client.AgentNotRunning.exit_code == exits.NO_AGENT
    assert errors.UsageError.exit_code == exits.USAGE
    assert issubclass(client.AgentNotRunning, errors.AgentUnreachable)
    assert client.AgentError is errors.AgentError
