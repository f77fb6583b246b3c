"""What a new user meets at the `aemagent` and `aem-token` command lines: the demo on a machine
that already has a config, pasting a credential at a terminal, `reload`, `start` with options,
a slow IMS, and the wording of the messages. Real processes, real sockets, loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import fakeagent
import procs
import pytest

from aemagent import exits

pytestmark = pytest.mark.integration


# ---- 1. the demo does not read the user's config file


def test_demo_ignores_the_users_config_and_profile(tmp_path, ims):
    home = tmp_path / "home"
    confdir = home / ".config" / "aemagent"
    confdir.mkdir(parents=True)
    marker = tmp_path / "command-ran"
    # A default profile whose token comes from another IMS (the test's emulator): were the demo to
    # read this file, its aem-token would pick this profile and the demo's AEM stand-in say 401.
    (confdir / "config.toml").write_text(
        "[profiles.mine]\n"
        f'command = "touch {marker}; cat {ims.credentials["oauth"]}"\n'
        "default = true\n"
    )
    os.chmod(confdir / "config.toml", 0o600)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = procs.base_env(
        TMPDIR=str(tmp),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        AEMAGENT_PROFILE="mine",
    )
    done = procs.run(procs.aemagent("demo"), env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout
    assert not marker.exists()  # the user's `command` did not run
    assert list(tmp.iterdir()) == []


# ---- 2. pasting a credential at a terminal; 6. a slow IMS at a terminal


class Terminal:
    """A child process whose stdin and stderr are a pty (stdout a pipe), as at a terminal."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, self.slave = os.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=self.slave,
            stdout=subprocess.PIPE,
            stderr=self.slave,
            env=env,
            start_new_session=True,
        )
        self.screen = b""

    def wait_for(self, text: bytes, timeout: float = procs.STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} never appeared; the screen shows {self.screen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the child is gone and closed the pty
                    assert text in self.screen, self.screen
                    return

    def type(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # the tty takes 4 KiB at a time, as its reader drains it
            view = view[os.write(self.master, view) :]

    def echo_is_on(self) -> bool:
        return bool(termios.tcgetattr(self.slave)[3] & termios.ECHO)

    def finish(self) -> tuple[int, str]:
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().decode()
        code = self.proc.wait(timeout=procs.STEP_TIMEOUT)
        with contextlib.suppress(OSError):
            while select.select([self.master], [], [], 0)[0]:
                chunk = os.read(self.master, 65536)
                if not chunk:
                    break
                self.screen += chunk
        return code, out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        os.close(self.master)
        os.close(self.slave)


@contextlib.contextmanager
def terminal(argv: list[str], env: dict[str, str]) -> Iterator[Terminal]:
    term = Terminal(argv, env)
    try:
        yield term
    finally:
        term.close()


def test_add_reads_a_pasted_credential_without_echo(agent, ims):
    credential = Path(ims.credentials["service"]).read_bytes()
    secret = json.loads(credential)
    secret = (secret.get("integration") or secret)["technicalAccount"]["clientSecret"]
    # One line longer than the tty's 4 KiB canonical line buffer, which would cut it short.
    one_line = b"{" + b" " * 5000 + json.dumps(json.loads(credential)).encode()[1:]
    with terminal(procs.aemagent("add"), agent.env) as term:
        assert term.echo_is_on()
        term.wait_for(b"it is read once complete, or at Ctrl-D")
        assert not term.echo_is_on()
        term.type(one_line + b"\n")  # complete JSON: no Ctrl-D needed
        code, out = term.finish()
        assert term.echo_is_on()  # restored
    assert code == 0, term.screen
    assert out.startswith("added profile p12345-e67890 ")
    assert secret.encode() not in term.screen  # never echoed
    # The newline may come after the JSON is complete, in the tty's next 4 KiB.
    read = f"aemagent: read {len(one_line)} bytes", f"aemagent: read {len(one_line) + 1} bytes"
    assert any(line.encode() in term.screen for line in read), term.screen[-300:]


def test_add_at_a_terminal_takes_a_bare_token_line_and_ctrl_d(agent, ims):
    with terminal(procs.aemagent("add"), agent.env) as term:
        term.wait_for(b"it is read once complete, or at Ctrl-D")
        term.type(b"\x04")  # Ctrl-D at once: nothing pasted
        code, out = term.finish()
        assert term.echo_is_on()
    assert code == exits.USAGE
    assert out == ""
    assert b"the pasted text is empty" in term.screen


def test_ctrl_c_while_pasting_restores_the_terminal(agent):
    with terminal(procs.aemagent("add"), agent.env) as term:
        term.wait_for(b"it is read once complete, or at Ctrl-D")
        assert not term.echo_is_on()
        term.type(b'{"half": ')
        term.proc.send_signal(signal.SIGINT)  # what the terminal sends for Ctrl-C
        code, out = term.finish()
        assert term.echo_is_on()
    assert code == 130
    assert out == ""
    assert b"Traceback" not in term.screen
    assert agent.cli("status", "--json").stdout.count('"name"') == 0


def test_add_says_it_waits_for_a_slow_ims_at_a_terminal_only(agent, ims):
    ims.fault(endpoint="jwt", delay=60)  # answered long after we look
    with terminal(procs.aemagent("add", ims.credentials["service"]), agent.env) as term:
        term.wait_for(b"aemagent: waiting for IMS\xe2\x80\xa6")
        term.proc.terminate()
    ims.clear()
    # Not a terminal: the output is what scripts always saw, even while IMS is slow.
    ims.fault(endpoint="jwt", delay=2)
    done = agent.cli("add", ims.credentials["service"], "--name", "scripted")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


# ---- 3. reload says how it went


@contextlib.contextmanager
def fake_agent(answers: dict[str, fakeagent.Canned]) -> Iterator[fakeagent.FakeAgent]:
    """A fake agent answering `answers[path]` (404 for any other path)."""

    def answer(request: fakeagent.Recorded) -> fakeagent.Canned:
        path = request.target.partition("?")[0]
        return answers.get(path) or fakeagent.error(404, "not_found", f"no such endpoint: {path}")

    with (
        fakeagent.short_socket_dir() as directory,
        fakeagent.FakeAgent(directory + "/agent.sock", answer) as fake,
    ):
        yield fake


@contextlib.contextmanager
def hup_catcher() -> Iterator[subprocess.Popen[str]]:
    """A process standing in for an older agent's PID: it prints HUP when it gets SIGHUP."""
    code = (
        "import signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP});"
        " print('ready', flush=True); signal.sigwait({signal.SIGHUP}); print('HUP', flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_reload_prints_what_the_agent_loaded():
    answer = {"reloaded": True, "profiles": ["one", "two"], "unloaded": {"three": "vault locked"}}
    health = {"status": "ok", "version": "x", "pid": 4242}
    routes = {"/v1/reload": fakeagent.json_answer(200, answer)}
    routes["/v1/health"] = fakeagent.json_answer(200, health)
    with fake_agent(routes) as fake:
        done = procs.run(procs.aemagent("reload"), procs.base_env(fake.path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "the agent (pid 4242) reloaded its config file: 2 profiles (one, two);"
        " not loaded: three: vault locked\n"
    )
    assert [r.method for r in fake.requests if r.target == "/v1/reload"] == ["POST"]


def test_reload_refused_by_the_agent_is_a_usage_error():
    message = "config file /x/config.toml is not valid TOML: Expected '=' (at line 1, column 5)"
    routes = {"/v1/reload": fakeagent.error(400, "bad_request", message)}
    with fake_agent(routes) as fake:
        done = procs.run(procs.aemagent("reload"), procs.base_env(fake.path))
    assert (done.returncode, done.stdout) == (exits.USAGE, "")
    assert done.stderr == f"aemagent: {message}\n"


def test_reload_of_an_older_agent_falls_back_to_sighup():
    with hup_catcher() as old:
        health = {"status": "ok", "version": "0.1", "pid": old.pid}
        with fake_agent({"/v1/health": fakeagent.json_answer(200, health)}) as fake:
            done = procs.run(procs.aemagent("reload"), procs.base_env(fake.path))
        assert done.returncode == 0, done.stderr
        assert f"asked the agent (pid {old.pid}) to reload" in done.stdout
        assert old.stdout is not None
        assert old.stdout.readline() == "HUP\n"


def test_reload_of_a_broken_config_says_so(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[profiles.one]\ncommand = "echo not-a-credential"\n')
    config.chmod(0o600)
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        done = agent.cli("reload")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"the agent (pid {agent.pid}) reloaded its config file: ")
        assert "not loaded: one: " in done.stdout
        assert done.stdout.count("\n") == 1

        config.write_text("[profiles.one\n")  # not TOML
        done = agent.cli("reload")
        assert (done.returncode, done.stdout) == (exits.USAGE, ""), done.stderr
        assert "is not valid TOML" in done.stderr
        assert done.stderr.count("\n") == 1

        config.write_text("")
        config.chmod(0o666)
        done = agent.cli("reload")
        assert done.returncode == exits.USAGE, done.stdout
        assert "is writable by others" in done.stderr


# ---- 4. a bad config file at start; 5. options given to a start that finds an agent


def _env(base: Path, sock: str | None = None) -> dict[str, str]:
    """HOME, config and state under `base`: nothing reads or writes the real home."""
    home = base / "home"
    home.mkdir(mode=0o700, exist_ok=True)
    return procs.base_env(
        sock,
        HOME=str(home),
        XDG_STATE_HOME=str(home / "state"),
        XDG_CONFIG_HOME=str(home / "config"),
    )


def _stop(sock: str, env: dict[str, str]) -> None:
    done = procs.run(procs.aemagent("stop", "--socket", sock), env)
    assert done.returncode == 0, done.stderr


def test_a_bad_config_file_is_one_usage_error_from_start_and_from_serve(base):
    sock = str(base / "s" / "agent.sock")
    bad = base / "bad.toml"
    bad.write_text("[agent\n")
    bad.chmod(0o600)
    env = _env(base)
    for command in ("start", "serve"):
        done = procs.run(procs.aemagent(command, "--socket", sock, "--config", str(bad)), env)
        assert (done.returncode, done.stdout) == (exits.USAGE, ""), (command, done.stderr)
        assert done.stderr.startswith(f"aemagent: config file {bad} is not valid TOML: "), command
        assert done.stderr.count("aemagent:") == 1, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
    assert procs.agent_pids(str(base)) == []


def test_start_with_options_warns_that_a_running_agent_keeps_its_settings(base):
    sock = str(base / "s" / "agent.sock")
    env = _env(base)
    first = procs.run(procs.aemagent("start", "--socket", sock), env)
    assert first.returncode == 0, first.stderr
    try:
        other = base / "other.toml"
        other.write_text("")
        other.chmod(0o600)
        for options in (["--config", str(other)], ["--log-level", "debug"]):
            done = procs.run(procs.aemagent("start", "--socket", sock, *options), env)
            assert done.returncode == 0, done.stderr
            assert done.stdout == first.stdout  # exactly the eval lines
            assert done.stderr.count("\n") == 1, done.stderr
            assert options[0] in done.stderr
            assert "keeps its settings" in done.stderr
            assert "`aemagent stop` first" in done.stderr
        plain = procs.run(procs.aemagent("start", "--socket", sock), env)
        assert (plain.stdout, plain.stderr) == (first.stdout, "")
    finally:
        _stop(sock, env)


# ---- 7. messages


def test_a_profile_name_from_the_environment_says_so_and_suggests(agent, ims):
    done = agent.cli("add", ims.credentials["oauth"], "--name", "stage")
    assert done.returncode == 0, done.stderr
    env = {**agent.env, "AEMAGENT_PROFILE": "stag"}
    done = procs.run(procs.aem_token(), env)
    assert (done.returncode, done.stdout) == (exits.NO_PROFILE, "")
    assert done.stderr == (
        "aem-token: no profile named stag (from $AEMAGENT_PROFILE); profiles: stage;"
        " did you mean stage?\n"
    )
    # Named on the command line: no word about the environment.
    done = procs.run(procs.aem_token("--profile", "stag"), env)
    assert done.returncode == exits.NO_PROFILE
    assert "AEMAGENT_PROFILE" not in done.stderr
    assert done.stderr.startswith("aem-token: no profile named stag; profiles: stage")
    # Far from every name: no suggestion.
    done = procs.run(procs.aem_token(), {**agent.env, "AEMAGENT_PROFILE": "zzzzzz"})
    assert "did you mean" not in done.stderr
    assert "(from $AEMAGENT_PROFILE)" in done.stderr


def test_a_truncated_json_credential_is_one_clear_line(agent, tmp_path):
    from aemagent.credentials import CredentialError, _load_json

    truncated = tmp_path / "cut.json"
    truncated.write_text('{\n  "client_id": "x",\n  "client_secret": "unterminated\n')
    truncated.chmod(0o644)  # readable by others too: still one line
    done = agent.cli("add", str(truncated))
    assert (done.returncode, done.stdout) == (exits.USAGE, ""), done.stderr
    assert done.stderr == (
        f"aemagent: {truncated} is not valid JSON: Unterminated string starting at line 3"
        " column 20\n"
    )
    with pytest.raises(CredentialError) as caught:  # the daemon's reader, for config files
        _load_json('{"a": "b')
    assert str(caught.value) == (
        "credential is not valid JSON: Unterminated string starting at line 1 column 7"
    )


def test_a_file_that_is_not_a_credential_is_named(agent, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    passwd.chmod(0o644)
    done = agent.cli("add", str(passwd))
    assert (done.returncode, done.stdout) == (exits.USAGE, "")
    assert done.stderr.startswith(f"aemagent: cannot add {passwd}: credential is neither JSON")
    assert done.stderr.count("\n") == 1  # the readable-by-others warning is not a second line


def test_a_readable_credential_is_warned_about_after_it_is_added(agent, ims, tmp_path):
    readable = tmp_path / "service.json"
    readable.write_bytes(Path(ims.credentials["service"]).read_bytes())
    readable.chmod(0o644)
    done = agent.cli("add", str(readable))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("added profile ")
    assert done.stderr == (
        f"aemagent: warning: {readable} is readable by other users (mode 644); once added,"
        " consider deleting it or `chmod 600` it\n"
    )


def test_bare_aemagent_prints_the_help():
    done = procs.run(procs.aemagent(), procs.base_env())
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("usage: aemagent ")
    assert done.stdout == procs.run(procs.aemagent("--help"), procs.base_env()).stdout


def test_status_with_no_profiles_exits_0(agent):
    """Decided: status reports what the agent holds, and holding nothing is an answer
    (ssh-add -l exits 1 there; `aem-token` is the check that exits 3)."""
    done = agent.cli("status")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "no profiles loaded; add one with `aemagent add FILE`\n"
    assert agent.token().returncode == exits.NO_PROFILE


# ---- 8. aem-token's help names every JSON field it prints


def test_aem_token_help_lists_every_json_field():
    from aemagent import helper

    done = procs.run(procs.aem_token("--help"), procs.base_env())
    assert done.returncode == 0
    for field in (*helper._JSON_FIELDS, *helper._JSON_OPTIONAL):
        assert f'"{field}"' in done.stdout, field
