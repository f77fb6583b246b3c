"""Every credential kind and the ways to pick and drop them, end to end: the real daemon, the IMS
emulator, the CLIs as subprocesses, `curl --unix-socket`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import procs
import pytest

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")


def aem_status(ims: procs.EmulatorProcess, token: str) -> int:
    status, _ = ims.aem("/aem/content/x.json", {"Authorization": f"Bearer {token}"})
    return status


def test_oauth_server_to_server(agent, ims):
    done = agent.cli("add", ims.credentials["oauth"], "--name", "oauth")
    assert done.returncode == 0, done.stderr
    assert "oauth credential" in done.stdout
    [seen] = ims.requests("token")
    assert seen["path"] == "/ims/token/v3"
    assert seen["fields"] == ["client_id", "client_secret", "grant_type", "scope"]
    info = json.loads(agent.token("--format", "json").stdout)
    assert info["expires_in"] > 86000  # seconds on this endpoint, not 86 million
    assert aem_status(ims, info["access_token"]) == 200
    headers = agent.token("--format", "headers").stdout.splitlines()
    oauth = json.loads(Path(ims.credentials["oauth"]).read_text())
    assert f"x-api-key: {oauth['client_id']}" in headers
    assert f"x-gw-ims-org-id: {oauth['org_id']}" in headers


def test_local_development_token(agent, ims, tmp_path):
    done = agent.cli("add", ims.credentials["devtoken"])
    assert done.returncode == 0, done.stderr
    token = agent.token("--profile", "devtoken").stdout.strip()
    assert aem_status(ims, token) == 200
    assert ims.requests("jwt") == ims.requests("token") == []  # never exchanged
    row = json.loads(agent.cli("status", "--json").stdout)["profiles"][0]
    assert (row["kind"], row["state"], row["refresh_at"]) == ("devtoken", "valid", None)
    done = agent.cli("refresh", "devtoken")
    assert done.returncode == 64
    assert "download a new one" in done.stderr
    # A bare token pasted on stdin works too.
    done = agent.cli("add", "--name", "pasted", stdin=(token + "\n").encode())
    assert done.returncode == 0, done.stderr
    assert agent.token("--profile", "pasted").stdout.strip() == token
    # Garbage is refused at add, clearly.
    done = agent.cli("add", "--name", "junk", stdin=b"not-a-token")
    assert done.returncode == 64
    assert "not-a-token" not in done.stderr


def test_a_service_credential_serves_its_aem_hosts_with_no_setup(agent, ims):
    done = agent.cli("add", ims.credentials["service"])
    assert done.returncode == 0, done.stderr
    agent.cli("add", ims.credentials["oauth"], "--name", "other")
    for host in ("author-p12345-e67890", "publish-p12345-e67890", "preview-p12345-e67890"):
        done = agent.token("--url", f"https://{host}.adobeaemcloud.com/content/x.json")
        assert done.returncode == 0, done.stderr
    done = agent.token("--url", "https://author-p12345-e678901.adobeaemcloud.com/")
    assert done.returncode == 3
    assert "no profile matches host author-p12345-e678901" in done.stderr
    # several profiles and no choice: exit 3 naming them
    done = agent.token()
    assert done.returncode == 3
    assert "other, p12345-e67890" in done.stderr
    env = {**agent.env, "AEMAGENT_PROFILE": "other"}
    assert procs.run(procs.aem_token("--format", "json"), env).returncode == 0
    assert (
        json.loads(procs.run(procs.aem_token("--format", "json"), env).stdout)["profile"] == "other"
    )


def test_two_accounts_of_one_environment_do_not_replace_each_other(agent, ims, tmp_path):
    assert agent.cli("add", ims.credentials["service"]).returncode == 0
    other = json.loads(Path(ims.credentials["service"]).read_text())
    other["integration"]["id"] = "SECOND0000000000000000BB@techacct.adobe.com"
    path = tmp_path / "second.json"
    path.write_text(json.dumps(other))
    path.chmod(0o600)
    done = agent.cli("add", str(path))
    assert done.returncode == 3
    assert "--name" in done.stderr
    assert agent.cli("add", str(path), "--name", "second").returncode == 4  # IMS: unknown sub
    assert len(json.loads(agent.cli("status", "--json").stdout)["profiles"]) == 2


def test_forget_revoke_invalidates_the_token_at_ims(agent, ims):
    agent.cli("add", ims.credentials["service"])
    token = agent.token().stdout.strip()
    assert aem_status(ims, token) == 200
    done = agent.cli("forget", "p12345-e67890", "--revoke")
    assert done.returncode == 0, done.stderr
    assert "IMS accepted the revocation (HTTP 200)" in done.stdout
    assert aem_status(ims, token) == 401
    agent.cli("add", ims.credentials["devtoken"])
    done = agent.cli("forget", "--all", "--revoke")
    assert "cannot be revoked by the agent" in done.stdout


def test_lifetime_forgets_the_credential(agent, ims):
    done = agent.cli("add", ims.credentials["service"], "--lifetime", "2s")
    assert done.returncode == 0, done.stderr
    assert agent.token().returncode == 0
    deadline = time.monotonic() + 10
    while agent.token().returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agent.token().returncode == 3


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_the_socket_api_with_curl(agent, ims):
    body = json.dumps(
        {
            "credential": json.loads(Path(ims.credentials["oauth"]).read_text()),
            "name": "viacurl",
            "hosts": ["api.example.com"],
        }
    )
    curl = [CURL, "-sS", "--unix-socket", agent.sock]
    done = subprocess.run(
        [*curl, "-X", "POST", "--data-binary", "@-", "http://aemagent/v1/profiles"],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout)["name"] == "viacurl"
    done = subprocess.run(
        [*curl, "http://aemagent/v1/token?url=https://api.example.com/x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout)["profile"] == "viacurl"
    done = subprocess.run(
        [*curl, "-X", "DELETE", "http://aemagent/v1/profiles/viacurl"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(done.stdout) == {"forgotten": ["viacurl"]}


def test_config_file_profiles_load_reload_and_save(tmp_path, ims):
    config = tmp_path / "config.toml"
    config.write_text(
        f'[profiles.fromfile]\nfile = "{ims.credentials["service"]}"\ndefault = true\n'
        f"[profiles.fromcommand]\ncommand = \"cat '{ims.credentials['oauth']}'\"\n"
        "[profiles.locked]\ncommand = \"echo 'vault is sealed' >&2; exit 2\"\n"
    )
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rows = {
                p["name"]: p for p in json.loads(agent.cli("status", "--json").stdout)["profiles"]
            }
            if rows["fromfile"]["state"] == "valid" and rows["fromcommand"]["state"] == "valid":
                break
            time.sleep(0.1)
        assert rows["locked"]["state"] == "unloaded"
        assert "vault is sealed" in rows["locked"]["last_error"]
        done = agent.token("--profile", "locked")
        assert done.returncode == 4
        assert "vault is sealed" in done.stderr
        assert json.loads(agent.token("--format", "json").stdout)["profile"] == "fromfile"
        kept = agent.token("--profile", "fromfile").stdout

        # SIGHUP (aemagent reload): `locked` is gone from the file, an added profile stays.
        assert agent.cli("add", ims.credentials["devtoken"]).returncode == 0
        config.write_text(config.read_text().split("[profiles.locked]")[0])
        assert agent.cli("reload").returncode == 0
        deadline = time.monotonic() + 10
        while "locked" in agent.cli("status").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        names = [p["name"] for p in json.loads(agent.cli("status", "--json").stdout)["profiles"]]
        assert names == ["devtoken", "fromcommand", "fromfile"]
        assert agent.token("--profile", "fromfile").stdout == kept  # unchanged: token kept

        # add --save records the path, never the content
        saved = tmp_path / "saved.toml"
        done = agent.cli(
            "add", ims.credentials["service"], "--name", "saved", "--save", "--config", str(saved)
        )
        assert done.returncode == 0, done.stderr
        assert tomllib.loads(saved.read_text()) == {
            "profiles": {"saved": {"file": ims.credentials["service"]}}
        }
        assert oct(saved.stat().st_mode & 0o777) == "0o600"
        secret = json.loads(Path(ims.credentials["service"]).read_text())["integration"][
            "technicalAccount"
        ]["clientSecret"]
        assert secret not in saved.read_text()


def test_a_broken_config_file_stops_serve_with_one_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[agent]\nhttps_proxi = 'http://x'\n")
    sock = str(tmp_path / "s.sock")
    done = procs.run(
        procs.aemagent("serve", "--socket", sock, "--config", str(config)),
        procs.base_env(),
        timeout=30,
    )
    assert done.returncode == 64
    assert "unknown key agent.https_proxi" in done.stderr
    assert str(config) in done.stderr
    assert not os.path.exists(sock)


def test_sighup_with_a_broken_config_keeps_everything(tmp_path, ims):
    config = tmp_path / "config.toml"
    config.write_text(f'[profiles.one]\nfile = "{ims.credentials["service"]}"\n')
    with procs.agent(tmp_path, "--config", str(config)) as agent:
        deadline = time.monotonic() + 20
        while agent.token("--profile", "one").returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        config.write_text("this is not toml [")
        os.kill(agent.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "not valid TOML" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "keeping the profiles as they are" in agent.log()
        assert agent.token("--profile", "one").returncode == 0


GIT = shutil.which("git")


@pytest.mark.skipif(CURL is None or GIT is None, reason="needs curl and git")
@pytest.mark.parametrize("kind", ["service", "oauth", "devtoken"])
def test_each_kind_through_every_caller(agent, ims, tmp_path, kind):
    """CLI, aem-token, git, curl --unix-socket and Python all get the same working token."""
    assert CURL is not None  # as the skipif made sure
    assert GIT is not None
    host = f"{kind}.aem.example"
    done = agent.cli("add", ims.credentials[kind], "--name", kind, "--host", host)
    assert done.returncode == 0, done.stderr
    token = agent.token("--url", f"https://{host}/content").stdout.strip()
    assert aem_status(ims, token) == 200

    home = tmp_path / "home"
    home.mkdir()
    env = dict(
        agent.env,
        HOME=str(home),
        GIT_CONFIG_GLOBAL=str(home / ".gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    subprocess.run(
        [GIT, "config", "--global", "credential.helper", "aemagent"],
        env=env,
        check=True,
        timeout=30,
    )
    filled = subprocess.run(
        [GIT, "credential", "fill"],
        input=f"protocol=https\nhost={host}\n\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer = dict(line.split("=", 1) for line in filled.stdout.splitlines())
    assert answer["password"] == token
    if kind == "devtoken":
        assert answer["username"] == "aem"

    via_socket = subprocess.run(
        [
            CURL,
            "-sS",
            "--unix-socket",
            agent.sock,
            "-H",
            "Accept: text/plain",
            f"http://aemagent/v1/token?profile={kind}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert via_socket.stdout == token

    python = procs.run(
        [
            sys.executable,
            "-c",
            (
                "from aemagent.client import get_token; import sys; "
                f"t = get_token(url='https://{host}/x'); sys.stdout.write(t.access_token)"
            ),
        ],
        agent.env,
    )
    assert python.stdout == token, python.stderr
