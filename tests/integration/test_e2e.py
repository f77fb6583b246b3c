"""A user's session, end to end: the real daemon on a real socket, the IMS emulator over loopback
HTTP, the real CLIs as subprocesses, and real `curl`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest

from aemagent.core.logs import fingerprint

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
NAME = "p12345-e67890"


def shell(agent: procs.AgentProcess, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell line the way a user types it, with the venv's scripts on PATH."""
    env = dict(agent.env)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, env=env, timeout=30, check=False
    )


def add_service(agent: procs.AgentProcess, ims: procs.EmulatorProcess, *args: str) -> None:
    done = agent.cli("add", ims.credentials["service"], *args)
    assert done.returncode == 0, done.stderr
    assert "token valid for 23h 59m" in done.stdout


@needs_curl
def test_a_new_users_session(agent, ims):
    add_service(agent, ims)
    aem = f"{ims.url}/aem/content/site.json"

    # The safe idiom: the token never appears on a command line.
    done = shell(agent, f"aem-token --format header | curl -sS --noproxy '*' -H @- {aem}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["client_id"] == "cm-p12345-e67890"

    # The common idiom the mission names.
    done = shell(
        agent,
        f'curl -sS --noproxy "*" -H "Authorization: Bearer $(aem-token)" {aem} -w "%{{http_code}}"',
    )
    assert done.stdout.endswith("200"), done.stdout

    # Any HTTP client can talk to the socket.
    done = shell(agent, f"curl -sS --unix-socket {agent.sock} http://aemagent/v1/health")
    assert json.loads(done.stdout)["pid"] == agent.pid
    done = shell(
        agent, f"curl -sS --unix-socket {agent.sock} 'http://aemagent/v1/token?profile={NAME}'"
    )
    answer = json.loads(done.stdout)
    assert answer["profile"] == NAME
    assert answer["expires_in"] > 86000

    status = agent.cli("status")
    assert status.returncode == 0
    header, row = status.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "KIND", "STATE"]
    assert row.split()[:5] == [NAME, "service", "valid", "23h", "59m"]

    listing = json.loads(agent.cli("status", "--json").stdout)["profiles"]
    assert listing[0]["expires_at"] == answer["expires_at"]
    assert isinstance(listing[0]["refresh_at"], int)

    # Forget: nothing on stdout, exit 3; the token no longer works for scripts.
    assert agent.cli("forget", NAME).returncode == 0
    done = agent.token("--profile", NAME)
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.count("\n") == 1

    # No agent: exit 2 at once.
    assert agent.cli("stop").returncode == 0
    start = time.monotonic()
    done = agent.token()
    assert (done.returncode, done.stdout) == (2, "")
    assert "aemagent start" in done.stderr
    assert time.monotonic() - start < 5


def test_the_ims_request_is_exactly_what_ims_md_says(agent, ims):
    add_service(agent, ims)
    [seen] = ims.requests("jwt")
    assert seen["method"] == "POST"
    assert seen["path"] == "/ims/exchange/jwt"
    assert seen["content_type"] == "application/x-www-form-urlencoded"
    assert seen["fields"] == ["client_id", "client_secret", "jwt_token"]
    assert seen["jwt"]["header"] == {"alg": "RS256", "typ": "JWT"}
    claims = seen["jwt"]["claims"]
    integration = json.loads(Path(ims.credentials["service"]).read_text())["integration"]
    assert claims == {
        "exp": claims["iat"] + 300,
        "iat": claims["iat"],
        "iss": integration["org"],
        "sub": integration["id"],
        "aud": f"{ims.url}/c/cm-p12345-e67890",
        f"{ims.url}/s/ent_aem_cloud_api": True,
    }
    assert abs(claims["iat"] - time.time()) < 60


def test_output_formats(agent, ims):
    add_service(agent, ims)
    token = agent.token().stdout
    assert token.endswith("\n")
    token = token.strip()
    assert agent.token("--format", "header").stdout == f"Authorization: Bearer {token}\n"
    headers = agent.token("--format", "headers").stdout.splitlines()
    assert headers == [
        f"Authorization: Bearer {token}",
        "x-api-key: cm-p12345-e67890",
        f"x-gw-ims-org-id: {json.loads(Path(ims.credentials['service']).read_text())['integration']['org']}",
    ]
    info = json.loads(agent.token("--format", "json").stdout)
    assert info["access_token"] == token
    assert info["token_type"] == "Bearer"
    assert info["profile"] == NAME
    service = json.loads(Path(ims.credentials["service"]).read_text())["integration"]
    assert info["account"] == service["id"]  # the technical account, as git's username
    assert abs(info["expires_at"] - (time.time() + info["expires_in"])) <= 2
    done = shell(agent, 'eval "$(aem-token --format env)"; printf %s "$AEM_ACCESS_TOKEN"')
    assert done.stdout == token
    # An explicit min_valid longer than a token lives is a usage error.
    done = agent.token("--min-valid", "100000")
    assert (done.returncode, done.stdout) == (64, "")
    assert "longer than a fresh token" in done.stderr


def test_bad_credentials_get_one_line_and_lose_nothing(agent, ims, tmp_path):
    add_service(agent, ims)
    good = json.loads(Path(ims.credentials["service"]).read_text())
    secret = good["integration"]["technicalAccount"]["clientSecret"]
    cases = {
        "truncated.json": json.dumps(good)[:200],
        "wrong-type.json": json.dumps({**good, "integration": {**good["integration"], "org": 42}}),
        "no-secret.json": json.dumps(
            {
                **good,
                "integration": {
                    **good["integration"],
                    "technicalAccount": {"clientId": "cm-p1-e2"},
                },
            }
        ),
        "cert-as-key.json": json.dumps(
            {
                **good,
                "integration": {
                    **good["integration"],
                    "privateKey": good["integration"]["publicKey"],
                },
            }
        ),
    }
    for filename, text in cases.items():
        path = tmp_path / filename
        path.write_text(text)
        path.chmod(0o600)
        done = agent.cli("add", str(path))
        assert done.returncode == 64, (filename, done.stderr)
        assert done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert secret not in done.stderr
    assert "integration.org" in agent.cli("add", str(tmp_path / "wrong-type.json")).stderr
    # The good profile is untouched and still serves.
    assert agent.token().returncode == 0
    assert len(json.loads(agent.cli("status", "--json").stdout)["profiles"]) == 1


def test_ims_refusal_is_clear_and_not_retried(agent, ims):
    ims.fault(
        endpoint="jwt",
        count=1,
        status=401,
        error="invalid_client",
        error_description="invalid client_secret parameter",
    )
    done = agent.cli("add", ims.credentials["service"])
    assert done.returncode == 4
    assert "invalid_client" in done.stderr
    assert "invalid client_secret parameter" in done.stderr
    assert "X-Debug-Id" in done.stderr
    for _ in range(5):
        done = agent.token()
        assert done.returncode == 4
        assert "aemagent refresh p12345-e67890" in done.stderr
    assert len(ims.requests("jwt")) == 1  # no hammering
    assert "failed" in agent.cli("status").stdout
    done = agent.cli("refresh", NAME)  # the fault is used up: IMS accepts now
    assert done.returncode == 0, done.stderr
    assert agent.token().returncode == 0


def test_transient_ims_errors_are_retried_until_a_token_is_served(agent, ims):
    ims.fault(endpoint="jwt", count=3, status=503)
    done = agent.cli("add", ims.credentials["service"])
    assert done.returncode == 0, done.stderr
    statuses = [r["status"] for r in ims.requests("jwt")]
    assert statuses == [503, 503, 503, 200]


def test_clock_skew_is_corrected_with_one_retry(agent, ims):
    ims.http("POST", "/_emulator/clock", {"offset": 3600})  # IMS is an hour ahead of us
    add_service(agent, ims)
    seen = ims.requests("jwt")
    assert [r["status"] for r in seen] == [400, 200]
    assert seen[1]["jwt"]["claims"]["exp"] - seen[0]["jwt"]["claims"]["exp"] == pytest.approx(
        3600, abs=5
    )


def test_logs_show_fingerprints_not_tokens(agent, ims):
    add_service(agent, ims)
    token = agent.token().stdout.strip()
    log = agent.log()
    assert fingerprint(token) in log
    assert token not in log
    assert token.split(".")[2][:16] not in log


def test_short_lived_tokens_are_refreshed_ahead_of_expiry(tmp_path):
    with procs.emulator(tmp_path, "--token-lifetime", "8") as ims, procs.agent(tmp_path) as agent:
        done = agent.cli("add", ims.credentials["service"])
        assert done.returncode == 0, done.stderr
        first = agent.token().stdout
        # Refreshed when a quarter (2 s) of the 8 s lifetime is left, so within about 6.5 s.
        deadline = time.monotonic() + 15
        while len(ims.requests("jwt")) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(ims.requests("jwt")) >= 2
        assert agent.token().stdout != first
        # min_valid forces a fresh token when the current one has too little left.
        calls = len(ims.requests("jwt"))
        info = json.loads(agent.token("--min-valid", "7", "--format", "json").stdout)
        assert info["expires_in"] >= 7
        assert len(ims.requests("jwt")) >= calls
        status, _ = ims.aem("/aem/x", {"Authorization": f"Bearer {info['access_token']}"})
        assert status == 200


def test_demo_runs_and_cleans_up(tmp_path):
    env = procs.base_env(TMPDIR=str(tmp_path))
    done = procs.run(procs.aemagent("demo"), env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HTTP 200" in done.stdout or '"ok":true' in done.stdout
    assert "demo OK" in done.stdout
    assert list(tmp_path.iterdir()) == []  # its temp dir is gone
