"""git mode: `aem-token get|store|erase` and `git-credential-aemagent`.

Three layers: the protocol in-process against the fake agent; real `git credential` driving the
installed helper against the fake agent; and real git against the real daemon and the IMS
emulator (the forced refresh on `erase`: only while the rejected token is still current, and at
most once a minute).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import cast

import procs
import pytest
from fakeagent import (
    Canned,
    FakeAgent,
    FakeProfile,
    FakeProfiles,
    error,
    json_answer,
    short_socket_dir,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from aemagent import gitcred, helper

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")
SCRIPT = Path(sys.executable).with_name("git-credential-aemagent")
needs_script = pytest.mark.skipif(
    not SCRIPT.exists(), reason="git-credential-aemagent is not installed next to the interpreter"
)

AEM_HOST = "author-p1-e2.adobeaemcloud.com"
ACCOUNT = "ABCDEF@techacct.adobe.com"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def attrs(**fields: str) -> bytes:
    return "".join(f"{key}={value}\n" for key, value in fields.items()).encode() + b"\n"


@pytest.fixture
def profiles() -> FakeProfiles:
    return FakeProfiles(
        FakeProfile(
            "p1-e2", hosts=("*.adobeaemcloud.com",), token=TOKEN, account=ACCOUNT, client_id="cm"
        ),
        FakeProfile("other", hosts=("other.example",), token="other.tok.en"),
    )


@pytest.fixture
def fake(profiles, monkeypatch):
    monkeypatch.delenv("AEMAGENT_PROFILE", raising=False)
    with short_socket_dir() as directory, FakeAgent(directory + "/agent.sock", profiles) as fake:
        yield fake


@contextlib.contextmanager
def stdin_from(data: bytes, directory: Path):
    """fd 0 reads `data` (the helper reads fd 0 directly, not sys.stdin)."""
    source = directory / "stdin"
    source.write_bytes(data)
    saved = os.dup(0)
    with source.open("rb") as f:
        os.dup2(f.fileno(), 0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)


@pytest.fixture
def helper_run(capfd, tmp_path):
    """Runs the helper in-process as git does; returns (exit code, stdout, stderr)."""

    def run(action, stdin=b"", *options, sock=None, as_git=True):
        argv = [*options] + (["--socket", sock] if sock else [])
        with stdin_from(stdin, tmp_path):
            if as_git:  # git-credential-aemagent [OPTIONS] ACTION
                code = gitcred.git_main([*argv, action])
            else:  # aem-token ACTION [OPTIONS]
                code = helper.main([action, *argv])
        out, err = capfd.readouterr()
        if code != 0:
            assert out == "", "nothing on stdout on failure: git would use it anyway"
        if err:
            assert err.count("\n") == 1, f"at most one stderr line, got {err!r}"
            prog = "git-credential-aemagent" if as_git else "aem-token"
            assert err.startswith(f"{prog}: ")
        return code, out, err

    return run


# --- get ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_git", [True, False])
def test_get_answers_a_known_host(fake, helper_run, as_git):
    stdin = attrs(protocol="https", host=AEM_HOST, path="content/repo.git")
    code, out, err = helper_run("get", stdin, sock=fake.path, as_git=as_git)
    assert (code, err) == (0, "")
    assert out == f"username={ACCOUNT}\npassword={TOKEN}\npassword_expiry_utc=1900000000\n"
    [request] = fake.requests
    assert request.target == (
        "/v1/token?url=https%3A%2F%2Fauthor-p1-e2.adobeaemcloud.com%2Fcontent%2Frepo.git"
    )
    assert request.header("accept") == "application/json"


def test_username_is_aem_without_an_account(fake, helper_run, profiles):
    profiles.profiles["p1-e2"].account = None
    out = helper_run("get", attrs(protocol="https", host=AEM_HOST), sock=fake.path)[1]
    assert out.startswith("username=aem\npassword=")


def test_get_keeps_the_port(fake, helper_run):
    helper_run("get", attrs(protocol="https", host=AEM_HOST + ":8443"), sock=fake.path)
    assert fake.requests[0].target.endswith("adobeaemcloud.com%3A8443%2F")


@pytest.mark.parametrize(
    "stdin",
    [
        b"protocol=https\r\nhost=author-p1-e2.adobeaemcloud.com\r\n\r\n",  # CRLF
        b"protocol=https\nhost=author-p1-e2.adobeaemcloud.com",  # EOF, no blank line
        b"protocol=https\nhost=author-p1-e2.adobeaemcloud.com\n\nhost=other.example\n",
        (
            b"capability[]=authtype\nwwwauth[]=Bearer realm=x\nno equals sign\n=x\n"
            b"protocol=https\nhost=author-p1-e2.adobeaemcloud.com\n\n"
        ),
        b"host=other.example\nurl=https://me@author-p1-e2.adobeaemcloud.com\n\n",  # url= replaces
        b"protocol=http\nurl=HTTPS://author-p1-e2.adobeaemcloud.com/a/b?c\n\n",
    ],
)
def test_input_forms(fake, helper_run, stdin):
    code, out, _ = helper_run("get", stdin, sock=fake.path)
    assert (code, out.splitlines()[1]) == (0, f"password={TOKEN}")
    assert "author-p1-e2.adobeaemcloud.com" in fake.requests[0].target


@pytest.mark.parametrize(
    "stdin",
    [
        attrs(protocol="http", host=AEM_HOST),
        attrs(protocol="ssh", host=AEM_HOST),
        attrs(host=AEM_HOST),
        attrs(protocol="https"),
        attrs(protocol="https", host=""),
        b"\nprotocol=https\nhost=author-p1-e2.adobeaemcloud.com\n",  # a blank line first
        attrs(protocol="https", host=AEM_HOST + "\\@evil.example"),
        attrs(protocol="https", host="evil.example/.adobeaemcloud.com"),
        attrs(protocol="https", host="evil.example#.adobeaemcloud.com"),
        attrs(protocol="https", host="a b.adobeaemcloud.com"),
        attrs(protocol="https", host="x" * 301),
        attrs(url=f"http://{AEM_HOST}/"),
        attrs(url=AEM_HOST),
        b"",
    ],
)
def test_not_ours_gets_nothing_and_asks_nothing(fake, helper_run, stdin):
    assert helper_run("get", stdin, sock=fake.path) == (0, "", "")
    assert fake.requests == []


def test_unknown_host_gets_nothing(fake, helper_run):
    assert helper_run("get", attrs(protocol="https", host="github.com"), sock=fake.path) == (
        0,
        "",
        "",
    )
    assert fake.requests[0].target == "/v1/token?url=https%3A%2F%2Fgithub.com%2F"


def test_environment_profile_is_never_used(fake, helper_run, monkeypatch):
    # git asks for every https host: a default profile would send its token to github.com.
    monkeypatch.setenv("AEMAGENT_PROFILE", "p1-e2")
    assert helper_run("get", attrs(protocol="https", host="github.com"), sock=fake.path)[1] == ""


def test_pinned_profile(fake, helper_run):
    stdin = attrs(protocol="https", host="anything.example")
    code, out, _ = helper_run("get", stdin, "--profile", "other", "--min-valid=600", sock=fake.path)
    assert (code, out.splitlines()[1]) == (0, "password=other.tok.en")
    assert fake.requests[0].target == "/v1/token?profile=other&min_valid=600"


def test_pinned_profile_that_does_not_exist_says_so(fake, helper_run):
    code, out, err = helper_run(
        "get", attrs(protocol="https", host="x.example"), "-p", "gone", sock=fake.path
    )
    assert (code, out) == (3, "")
    assert err == "git-credential-aemagent: no profile named gone; profiles: other, p1-e2\n"


@pytest.mark.parametrize(
    ("answer", "code", "message"),
    [
        (error(409, "ambiguous", "several profiles match host h: a, b"), 3, "several"),
        (error(503, "unavailable", "IMS: invalid_client (X-Debug-Id: 1)"), 4, "invalid_client"),
        (error(400, "bad_request", "min_valid is too long"), 64, "min_valid"),
        (Canned(500, b"oops", "text/plain"), 1, "unexpected HTTP 500"),
        (json_answer(200, {"access_token": TOKEN}), 1, "no valid expires_at"),
        (json_answer(200, {"access_token": "a b", "expires_at": 1}), 1, "access_token"),
        (Canned(raw=b"garbage\r\n\r\n"), 1, "not an HTTP answer"),
    ],
)
def test_errors_are_one_line_and_nothing_on_stdout(fake, helper_run, answer, code, message):
    fake.answer = answer
    result = helper_run("get", attrs(protocol="https", host=AEM_HOST), sock=fake.path)
    assert result[:2] == (code, "")
    assert message in result[2]


def test_no_agent_is_quiet_for_hosts_that_may_not_be_ours(helper_run, tmp_path):
    gone = str(tmp_path / "no.sock")
    stdin = attrs(protocol="https", host="github.com")
    assert helper_run("get", stdin, sock=gone) == (0, "", "")


@pytest.mark.parametrize(
    ("host", "options"),
    [(AEM_HOST, ()), ("AUTHOR-P1-E2.adobeaemcloud.com:443", ()), ("x.example", ("-p", "x"))],
)
def test_no_agent_is_one_line_for_aem_hosts_and_pinned_profiles(
    helper_run, tmp_path, host, options
):
    gone = str(tmp_path / "no.sock")
    code, out, err = helper_run("get", attrs(protocol="https", host=host), *options, sock=gone)
    assert (code, out) == (2, "")
    assert err == (
        f"git-credential-aemagent: no agent at {gone} (no such file); "
        "start it with `aemagent start`\n"
    )


def test_oversized_input_is_refused(fake, helper_run):
    stdin = b"protocol=https\nhost=" + b"a" * gitcred.MAX_GIT_INPUT + b"\n\n"
    code, out, err = helper_run("get", stdin, sock=fake.path)
    assert (code, out) == (64, "")
    assert "longer than 64 KiB" in err
    assert fake.requests == []


# --- erase and store ---------------------------------------------------------------------------


def test_erase_forces_one_refresh_then_get_serves_the_new_token(fake, helper_run, profiles):
    rejected = attrs(protocol="https", host=AEM_HOST, username=ACCOUNT, password=TOKEN)
    assert helper_run("erase", rejected, sock=fake.path) == (0, "", "")
    lookup, refresh = fake.requests
    assert lookup.target.endswith("&min_valid=0")  # the lookup never refreshes by itself
    assert (refresh.method, refresh.target) == ("POST", "/v1/profiles/p1-e2/refresh")
    assert json.loads(refresh.body) == {"if_current": sha256(TOKEN)}
    assert refresh.header("content-type") == "application/json"

    new = profiles.profiles["p1-e2"].token
    assert new != TOKEN
    out = helper_run("get", attrs(protocol="https", host=AEM_HOST), sock=fake.path)[1]
    assert out.splitlines()[1] == f"password={new}"

    # The same rejected token again, or the new one within a minute: no further refresh.
    helper_run("erase", rejected, sock=fake.path)
    helper_run("erase", attrs(protocol="https", host=AEM_HOST, password=new), sock=fake.path)
    assert profiles.profiles["p1-e2"].token == new


def test_erase_with_a_pinned_profile_skips_the_lookup(fake, helper_run):
    stdin = attrs(protocol="https", host="x.example", password="some.tok.en")
    assert helper_run("erase", stdin, "--profile=other", sock=fake.path) == (0, "", "")
    [refresh] = fake.requests
    assert refresh.target == "/v1/profiles/other/refresh"
    assert json.loads(refresh.body) == {"if_current": sha256("some.tok.en")}


@pytest.mark.parametrize(
    "stdin",
    [
        attrs(protocol="https", host=AEM_HOST),  # no password: nothing to prove
        attrs(protocol="https", host=AEM_HOST, password=""),
        attrs(protocol="http", host=AEM_HOST, password=TOKEN),
    ],
)
def test_erase_without_a_token_to_prove_asks_nothing(fake, helper_run, stdin):
    assert helper_run("erase", stdin, sock=fake.path) == (0, "", "")
    assert fake.requests == []


def test_erase_is_quiet_when_nothing_can_be_done(fake, helper_run, tmp_path):
    unknown = attrs(protocol="https", host="github.com", password="x")
    assert helper_run("erase", unknown, sock=fake.path) == (0, "", "")
    assert [r.method for r in fake.requests] == ["GET"]
    known = attrs(protocol="https", host=AEM_HOST, password="x")
    assert helper_run("erase", known, sock=str(tmp_path / "no.sock")) == (0, "", "")


def test_erase_reports_an_agent_error(fake, helper_run):
    fake.answer = error(503, "unavailable", "IMS is down")
    code, out, err = helper_run(
        "erase", attrs(protocol="https", host=AEM_HOST, password="x"), sock=fake.path
    )
    assert (code, out, err) == (4, "", "git-credential-aemagent: IMS is down\n")


def test_erase_hashes_the_bytes_git_sent(fake, helper_run):
    stdin = b"protocol=https\nhost=x.example\npassword=t\xe9\xff\n\n"
    helper_run("erase", stdin, "-p", "other", sock=fake.path)
    assert json.loads(fake.requests[0].body) == {
        "if_current": hashlib.sha256(b"t\xe9\xff").hexdigest()
    }


@pytest.mark.parametrize("stdin", [attrs(protocol="https", host=AEM_HOST, password=TOKEN), b""])
def test_store_is_a_no_op(fake, helper_run, stdin):
    assert helper_run("store", stdin, sock=fake.path) == (0, "", "")
    huge = b"password=" + b"x" * (2 * gitcred.MAX_GIT_INPUT)
    assert helper_run("store", huge, sock=fake.path) == (0, "", "")
    assert fake.requests == []


# --- command line ------------------------------------------------------------------------------


def test_unknown_actions_are_ignored_silently(fake, helper_run):
    # git's rule for helpers: an operation the helper does not support is silently ignored.
    assert helper_run("capability", attrs(protocol="https", host=AEM_HOST), sock=fake.path) == (
        0,
        "",
        "",
    )
    assert fake.requests == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "an action is needed"),
        (["--socket", "/x"], "an action is needed"),
        (["--format", "json", "get"], "do not apply"),
        (["--url", "https://h", "get"], "do not apply"),
        (["get", "erase"], "unexpected argument 'erase'"),
        (["--bogus", "get"], "unknown option '--bogus'"),
        (["--min-valid", "soon", "get"], "--min-valid needs a whole number"),
    ],
)
def test_git_main_usage_errors(capfd, argv, message):
    assert gitcred.git_main(argv) == 64
    out, err = capfd.readouterr()
    assert out == ""
    assert err.startswith("git-credential-aemagent: ")
    assert message in err
    assert err.endswith("see `git-credential-aemagent --help`\n")


def test_git_main_help_and_version(capfd):
    from aemagent import __version__

    assert gitcred.git_main(["--help"]) == 0
    assert capfd.readouterr().out == gitcred.GIT_USAGE
    assert all(len(line) <= 100 for line in gitcred.GIT_USAGE.splitlines())
    assert gitcred.git_main(["--version"]) == 0
    assert capfd.readouterr().out == f"git-credential-aemagent {__version__}\n"


def test_aem_token_takes_the_action_anywhere(fake, helper_run, capfd, tmp_path):
    # `credential.helper = "!aem-token --socket PATH"`: git appends the action at the end.
    with stdin_from(attrs(protocol="https", host=AEM_HOST), tmp_path):
        assert helper.main(["--socket", fake.path, "get"]) == 0
    assert capfd.readouterr().out.startswith(f"username={ACCOUNT}\n")
    # ... but only git's three: anything else is still a usage error, and so is --format.
    assert helper.main(["--socket", fake.path, "fill"]) == 64
    assert helper.main(["get", "--format", "json"]) == 64
    # A profile named "get" and no action: the ordinary token path.
    assert helper.main(["--profile", "get", "--socket", fake.path + ".none"]) == 2
    capfd.readouterr()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_input_parses_or_is_ignored(data):
    parsed = gitcred.parse_git_attributes(data)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())
    host = gitcred._https_host(parsed)
    if host is not None:
        assert not set(host) & set("/\\@#?% \t\r\n")


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="ascii"), max_size=40),
    st.text(alphabet=st.characters(codec="ascii"), max_size=40),
)
def test_a_host_we_accept_is_the_host_the_agent_sees(host, path):
    """The URL we send cannot make the agent match a host other than the one git connects to."""
    from urllib.parse import urlsplit

    if gitcred._https_host({"protocol": "https", "host": host}) is None:
        return
    try:
        seen = urlsplit(f"https://{host}/{path}").hostname
    except ValueError:  # the agent answers 400 to such a URL: no token either
        return
    lowered = host.lower()
    assert seen is None or lowered == seen or lowered.startswith((f"{seen}:", f"[{seen}]"))


# --- real git, fake agent ----------------------------------------------------------------------


def git_env(home: Path, sock: str, *helpers: str) -> dict[str, str]:
    """git with only the configuration given here: no system config, a private HOME."""
    home.mkdir(exist_ok=True)
    env = procs.base_env(sock)
    for name in ("GIT_ASKPASS", "SSH_ASKPASS", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT"):
        env.pop(name, None)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        GIT_CONFIG_GLOBAL=str(home / ".gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
    )
    for value in helpers:
        git(env, "config", "--global", "--add", "credential.helper", value)
    return env


def git(env: dict[str, str], *args: str, stdin: bytes | None = None):
    assert GIT is not None
    return subprocess.run(
        [GIT, *args], input=stdin, env=env, capture_output=True, timeout=30, check=False
    )


def fill(env: dict[str, str], host: str) -> dict[str, str]:
    """`git credential fill` for https://host; {} when git could not fill it."""
    done = git(env, "credential", "fill", stdin=attrs(protocol="https", host=host))
    if done.returncode != 0:
        assert b"terminal prompts disabled" in done.stderr, done.stderr
        return {}
    return dict(line.split("=", 1) for line in done.stdout.decode().splitlines())


def recording(log: Path, command: str) -> str:
    """A helper line that runs `command` and appends what it printed to `log`."""
    return f'!f() {{ {command} "$@" | tee -a {log}; }}; f'


@needs_git
@needs_script
@pytest.mark.parametrize(
    "helper_line",
    [
        "aemagent",  # what docs/CALLERS.md tells users: git runs `git-credential-aemagent get`
        "aemagent --socket {sock}",
        "!aem-token --socket {sock}",
        "!{python} -m aemagent.helper --socket {sock}",
    ],
)
def test_real_git_with_each_helper_form(fake, tmp_path, helper_line):
    line = helper_line.format(sock=fake.path, python=sys.executable)
    env = git_env(tmp_path / "home", fake.path, line)
    if "{sock}" in helper_line:
        env["AEMAGENT_SOCK"] = fake.path + ".not-this-one"
    got = fill(env, AEM_HOST)
    assert (got["username"], got["password"]) == (ACCOUNT, TOKEN)
    assert fill(env, "github.com") == {}


@needs_git
@needs_script
def test_real_git_reject_forces_a_refresh(fake, tmp_path, profiles):
    env = git_env(tmp_path / "home", fake.path, str(SCRIPT))
    first = fill(env, AEM_HOST)
    done = git(env, "credential", "reject", stdin=attrs(**first))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert fill(env, AEM_HOST)["password"] == profiles.profiles["p1-e2"].token != TOKEN


@needs_git
@needs_script
def test_real_git_scoped_helper_keeps_tokens_from_store(fake, tmp_path):
    """The configuration docs/CALLERS.md recommends, checked with real git.

    git hands every credential that worked to EVERY configured helper's `store`; an empty
    `helper =` in the URL-scoped section resets the list (git reads config in file order, so the
    reset must come after the generic helper lines).
    """
    stored = tmp_path / "git-credentials"
    env = git_env(tmp_path / "home", fake.path, f"store --file {stored}")
    url = "https://*.adobeaemcloud.com"
    git(env, "config", "--global", f"credential.{url}.helper", "")
    git(env, "config", "--global", "--add", f"credential.{url}.helper", "aemagent")
    got = fill(env, AEM_HOST)
    assert got["password"] == TOKEN
    done = git(env, "credential", "approve", stdin=attrs(**got))
    assert done.returncode == 0
    assert not stored.exists() or TOKEN not in stored.read_text()

    # Without the reset line, `store` writes the token to disk: the warning is real.
    git(env, "config", "--global", "--unset-all", f"credential.{url}.helper")
    git(env, "config", "--global", "--add", f"credential.{url}.helper", "aemagent")
    git(env, "credential", "approve", stdin=attrs(**got))
    assert TOKEN in stored.read_text()


# --- real git, real daemon, IMS emulator --------------------------------------------------------


def service_account(ims: procs.EmulatorProcess) -> str:
    document = json.loads(Path(ims.credentials["service"]).read_text())
    return cast("str", document["integration"]["id"])


@needs_git
@needs_script
@pytest.mark.integration
def test_git_with_the_real_agent(agent, ims, tmp_path):
    done = agent.cli("add", ims.credentials["service"], "--host", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    log = tmp_path / "helper-output"
    env = git_env(tmp_path / "home", agent.sock, recording(log, str(SCRIPT)))

    # A known host: username, password and expiry, exactly as our helper printed them.
    got = fill(env, "127.0.0.1")
    assert got["username"] == service_account(ims)
    ours = dict(line.split("=", 1) for line in log.read_text().splitlines())
    assert ours["password"] == got["password"] == agent.token().stdout.strip()
    expiry = json.loads(agent.token("--format", "json").stdout)["expires_at"]
    assert ours["password_expiry_utc"] == str(expiry)
    status, _ = ims.aem("/aem/content.json", {"Authorization": f"Bearer {got['password']}"})
    assert status == 200

    # An unknown host: our helper prints nothing, so git (prompts off) cannot fill it.
    log.write_text("")
    assert fill(env, "github.com") == {}
    assert log.read_text() == ""

    # Reject (git's erase) with the current token: the next fill gets a fresh one.
    def reject(credential):
        done = git(env, "credential", "reject", stdin=attrs(**credential))
        assert (done.returncode, done.stderr) == (0, b"")

    reject(got)
    second = fill(env, "127.0.0.1")
    assert second["password"] != got["password"]
    assert len(ims.requests("jwt")) == 2

    # A second reject within a minute does not refresh again, nor does the old token's.
    reject(second)
    reject(got)
    assert fill(env, "127.0.0.1")["password"] == second["password"]
    assert len(ims.requests("jwt")) == 2


@needs_git
@needs_script
@pytest.mark.integration
def test_git_with_a_derived_aem_host(agent, ims, tmp_path):
    # Service credentials for cm-p12345-e67890 match *-p12345-e67890.adobeaemcloud.com by themselves.
    done = agent.cli("add", ims.credentials["service"])
    assert done.returncode == 0, done.stderr
    env = git_env(tmp_path / "home", agent.sock, "aemagent")
    got = fill(env, "author-p12345-e67890.adobeaemcloud.com")
    assert got["username"] == service_account(ims)
    assert got["password"] == agent.token().stdout.strip()
    assert fill(env, "author-p99999-e67890.adobeaemcloud.com") == {}
