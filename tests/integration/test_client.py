"""Python callers: `aemagent.client` (stdlib) and `aemagent.httpx_auth.AemAgentAuth`.

Against the fake agent for the protocol and error mapping (with `httpx.MockTransport` standing in
for AEM), then against the real daemon and the IMS emulator's AEM stand-in, where a revoked token
makes AEM answer 401 and the auth class must force one refresh and retry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
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
    token_answer,
)

from aemagent import client
from aemagent.httpx_auth import AemAgentAuth

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_"
AEM = "https://author-p1-e2.adobeaemcloud.com"


@pytest.fixture
def profiles() -> FakeProfiles:
    return FakeProfiles(
        FakeProfile(
            "p1-e2",
            hosts=("*.adobeaemcloud.com",),
            token=TOKEN,
            account="TA@techacct.adobe.com",
            client_id="cm-p1-e2",
            org_id="ORG@AdobeOrg",
        ),
        FakeProfile("other", hosts=("other.example",), token="other.tok.en"),
    )


@pytest.fixture
def fake(profiles, monkeypatch):
    monkeypatch.delenv("AEMAGENT_PROFILE", raising=False)
    with short_socket_dir() as directory, FakeAgent(directory + "/agent.sock", profiles) as agent:
        monkeypatch.setenv("AEMAGENT_SOCK", agent.path)
        yield agent


# --- aemagent.client ---------------------------------------------------------------------------


def test_import_is_standard_library_only():
    probe = (
        "import sys; import aemagent.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'trio', 'httpx', 'jwt', 'cryptography', 'h11', 'anyio', 'platformdirs'}))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out == "[]\n"


def test_get_token_by_url(fake):
    token = client.get_token(url=AEM + "/content/x.json?q=1")
    assert token == client.Token(
        access_token=TOKEN,
        expires_at=1_900_000_000,
        expires_in=86_000,
        profile="p1-e2",
        client_id="cm-p1-e2",
        org_id="ORG@AdobeOrg",
        account="TA@techacct.adobe.com",
    )
    assert fake.requests[0].target == (
        "/v1/token?url=" + urllib.parse.quote(AEM + "/content/x.json?q=1", safe="")
    )
    assert fake.requests[0].header("accept") == "application/json"


@pytest.mark.parametrize(
    ("kwargs", "env", "target"),
    [
        ({"profile": "other"}, None, "/v1/token?profile=other"),
        ({}, "other", "/v1/token?profile=other"),
        (
            {"url": "https://other.example/"},
            "p1-e2",
            "/v1/token?url=https%3A%2F%2Fother.example%2F",
        ),
        ({"profile": "other", "min_valid": 300}, None, "/v1/token?profile=other&min_valid=300"),
        ({"profile": "other", "min_valid": 0.5}, None, "/v1/token?profile=other&min_valid=0.5"),
        ({"profile": "other", "min_valid": 30.0}, None, "/v1/token?profile=other&min_valid=30"),
    ],
)
def test_profile_choice(fake, monkeypatch, kwargs, env, target):
    if env:
        monkeypatch.setenv("AEMAGENT_PROFILE", env)
    assert client.get_token(**kwargs).access_token == "other.tok.en"
    assert fake.requests[0].target == target


def test_explicit_socket_wins(fake, monkeypatch):
    monkeypatch.setenv("AEMAGENT_SOCK", fake.path + ".nothere")
    assert client.get_token("other", socket=fake.path).profile == "other"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"profile": "a", "url": "https://b"},
        {"min_valid": -1},
        {"min_valid": float("nan")},
        {"min_valid": float("inf")},
        {"min_valid": True},
    ],
)
def test_misuse_is_a_value_error(fake, kwargs):
    with pytest.raises(ValueError, match=r"profile or url|min_valid"):
        client.get_token(**kwargs)
    assert fake.requests == []


def test_token_hides_itself_and_knows_its_headers():
    token = client.Token(TOKEN, 1_900_000_000, 100, "p", client_id="cm", org_id="O@AdobeOrg")
    for shown in (repr(token), str(token), repr([token]), f"{token}"):
        assert TOKEN not in shown
    assert repr(token) == (
        f"Token(profile='p', expires_at=1900000000, access_token=<{len(TOKEN)} chars>)"
    )
    assert token.headers() == {
        "Authorization": f"Bearer {TOKEN}",
        "x-api-key": "cm",
        "x-gw-ims-org-id": "O@AdobeOrg",
    }
    assert client.Token(TOKEN, 1, 1, "p").headers() == {"Authorization": f"Bearer {TOKEN}"}
    assert token.fingerprint() == hashlib.sha256(TOKEN.encode()).hexdigest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        token.access_token = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("answer", "exception", "exit_code", "message"),
    [
        (error(404, "not_found", "no profile matches host h"), client.NoSuchProfile, 3, "no pro"),
        (error(409, "ambiguous", "several: a, b\nc"), client.NoSuchProfile, 3, "several: a, b c"),
        (error(503, "unavailable", "IMS: invalid_client"), client.TokenUnavailable, 4, "IMS: "),
        (error(400, "bad_request", "min_valid too long"), client.BadRequest, 64, "min_valid"),
        (error(500, "internal", "internal error"), client.AgentError, 1, "internal error"),
        (Canned(502, b"<html>", "text/html"), client.AgentError, 1, "unexpected HTTP 502"),
        (Canned(raw=b"garbage\r\n\r\n"), client.AgentError, 1, "not an HTTP answer"),
        (Canned(200, b"[1]"), client.AgentError, 1, "not a JSON object"),
        (Canned(200, TOKEN.encode(), "text/plain"), client.AgentError, 1, "not a JSON object"),
        (json_answer(200, {"access_token": TOKEN}), client.AgentError, 1, "no profile"),
        (token_answer(TOKEN, expires_at=None), client.AgentError, 1, "expires_at"),
        (token_answer(TOKEN, expires_in=True), client.AgentError, 1, "expires_in"),
        (token_answer("a\nb"), client.AgentError, 1, "access_token"),
    ],
)
def test_errors(fake, answer, exception, exit_code, message):
    fake.answer = answer
    with pytest.raises(exception) as caught:
        client.get_token()
    assert type(caught.value) is exception
    assert caught.value.exit_code == exit_code
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_no_agent(tmp_path):
    gone = str(tmp_path / "agent.sock")
    with pytest.raises(client.AgentNotRunning) as caught:
        client.get_token(socket=gone)
    assert str(caught.value) == f"no agent at {gone} (no such file); start it with `aemagent start`"
    assert caught.value.exit_code == 2
    assert isinstance(caught.value, client.AgentError)


def test_force_refresh(fake, profiles):
    token = client.get_token("p1-e2")
    assert client.force_refresh(token) is True
    [_, refresh] = fake.requests
    assert (refresh.method, refresh.target) == ("POST", "/v1/profiles/p1-e2/refresh")
    assert json.loads(refresh.body) == {"if_current": hashlib.sha256(TOKEN.encode()).hexdigest()}
    assert refresh.header("content-type") == "application/json"
    new = client.get_token("p1-e2")
    assert new.access_token != TOKEN
    # The old token again, or the new one within a minute: the agent does not refresh.
    assert client.force_refresh(token) is False
    assert client.force_refresh(new.access_token, profile="p1-e2") is False
    assert profiles.profiles["p1-e2"].token == new.access_token


def test_force_refresh_needs_a_profile_for_a_bare_token(fake):
    with pytest.raises(ValueError, match="needs the profile"):
        client.force_refresh(TOKEN)
    assert fake.requests == []


def test_force_refresh_names_a_profile_safely(fake):
    with pytest.raises(client.NoSuchProfile):
        client.force_refresh("t", profile="a/b c")
    assert fake.requests[0].target == "/v1/profiles/a%2Fb%20c/refresh"


def test_force_refresh_against_an_agent_without_it(fake):
    fake.answer = json_answer(200, {"name": "p1-e2", "state": "valid"})  # an older agent
    with pytest.raises(client.AgentError, match="older aemagent"):
        client.force_refresh("t", profile="p1-e2")


# --- AemAgentAuth with a stand-in AEM -----------------------------------------------------------


class FakeAEM:
    """An `httpx.MockTransport` handler: 200 only for an agent's current, unrevoked token."""

    def __init__(self, profiles: FakeProfiles) -> None:
        self.profiles = profiles
        self.seen: list[httpx.Request] = []
        self.revoked: set[str] = set()
        self.refuse_all = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        current = {p.token for p in self.profiles.profiles.values()}
        if self.refuse_all or token not in current - self.revoked:
            return httpx.Response(401, json={"error": "invalid_token"})
        return httpx.Response(200, json={"body": request.content.decode()})


@pytest.fixture
def aem(profiles):
    return FakeAEM(profiles)


def test_auth_asks_the_agent_for_every_request(fake, aem, profiles):
    with httpx.Client(auth=AemAgentAuth(), transport=httpx.MockTransport(aem)) as http:
        assert http.get(AEM + "/content/x.json?secret=1").status_code == 200
        profiles.profiles["p1-e2"].token = "rotated.by.the.agent"
        assert http.get(AEM + "/content/y.json").status_code == 200
    assert [r.headers["authorization"] for r in aem.seen] == [
        f"Bearer {TOKEN}",
        "Bearer rotated.by.the.agent",
    ]
    assert aem.seen[0].headers["x-api-key"] == "cm-p1-e2"
    assert aem.seen[0].headers["x-gw-ims-org-id"] == "ORG@AdobeOrg"
    # Only scheme and host reach the agent: the query may carry secrets of its own.
    assert [r.target for r in fake.requests] == [
        "/v1/token?url=https%3A%2F%2Fauthor-p1-e2.adobeaemcloud.com%2F"
    ] * 2


def test_auth_with_a_pinned_profile_and_min_valid(fake, aem):
    auth = AemAgentAuth(profile="other", min_valid=120)
    with httpx.Client(auth=auth, transport=httpx.MockTransport(aem)) as http:
        http.get("https://anywhere.example/")
    assert fake.requests[0].target == "/v1/token?profile=other&min_valid=120"
    assert aem.seen[0].headers["authorization"] == "Bearer other.tok.en"


def test_auth_without_url_match_uses_the_default(fake, aem, monkeypatch):
    monkeypatch.setenv("AEMAGENT_PROFILE", "other")
    with httpx.Client(auth=AemAgentAuth(url_match=False), transport=httpx.MockTransport(aem)) as h:
        h.get(AEM)
    assert fake.requests[0].target == "/v1/token?profile=other"


def test_auth_keeps_headers_the_caller_set(fake, aem):
    with httpx.Client(auth=AemAgentAuth(), transport=httpx.MockTransport(aem)) as http:
        http.get(AEM, headers={"x-api-key": "mine", "Authorization": "Basic x"})
    assert aem.seen[0].headers["x-api-key"] == "mine"
    assert aem.seen[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_auth_sends_nothing_to_a_host_the_agent_does_not_know(fake, aem):
    with (
        httpx.Client(auth=AemAgentAuth(), transport=httpx.MockTransport(aem)) as http,
        pytest.raises(client.NoSuchProfile, match="no profile matches"),
    ):
        http.get("https://github.com/")
    assert aem.seen == []


def test_auth_on_401_forces_one_refresh_and_retries_with_the_body(fake, aem, profiles):
    aem.revoked.add(TOKEN)
    with httpx.Client(auth=AemAgentAuth(), transport=httpx.MockTransport(aem)) as http:
        response = http.post(AEM + "/bin/x", content=b"payload")
    assert response.status_code == 200
    assert response.json() == {"body": "payload"}
    assert [r.status_code for r in response.history] == [401]
    assert [r.content for r in aem.seen] == [b"payload", b"payload"]
    methods = [(r.method, r.target.split("?")[0]) for r in fake.requests]
    assert methods == [
        ("GET", "/v1/token"),
        ("POST", "/v1/profiles/p1-e2/refresh"),
        ("GET", "/v1/token"),
    ]
    assert json.loads(fake.requests[1].body) == {
        "if_current": hashlib.sha256(TOKEN.encode()).hexdigest()
    }
    assert aem.seen[1].headers["authorization"] == f"Bearer {profiles.profiles['p1-e2'].token}"


def test_auth_retries_once_only(fake, aem, profiles):
    aem.refuse_all = True
    with httpx.Client(auth=AemAgentAuth(), transport=httpx.MockTransport(aem)) as http:
        assert http.get(AEM).status_code == 401
        assert len(aem.seen) == 2  # the first try and one retry with the refreshed token
        # Within a minute the agent refuses another forced refresh: no retry with the same token.
        assert http.get(AEM).status_code == 401
        assert len(aem.seen) == 3
    assert profiles.profiles["p1-e2"].refreshes == 1


async def test_async_auth_under_trio(fake, aem):
    aem.revoked.add(TOKEN)
    transport = httpx.MockTransport(aem)
    async with httpx.AsyncClient(auth=AemAgentAuth(), transport=transport) as http:
        response = await http.post(AEM + "/bin/x", content=b"async payload")
    assert response.status_code == 200
    assert response.json() == {"body": "async payload"}
    assert [r.status_code for r in response.history] == [401]


# --- the real daemon and the emulator's AEM stand-in --------------------------------------------


def revoke(ims: procs.EmulatorProcess, token: str) -> None:
    """Invalidate a token the way Adobe's clients do."""
    account = json.loads(Path(ims.credentials["service"]).read_text())["integration"]
    form = urllib.parse.urlencode(
        {
            "token_type": "access_token",
            "token": token,
            "cascading": "all",
            "client_id": account["technicalAccount"]["clientId"],
            "client_secret": account["technicalAccount"]["clientSecret"],
        }
    ).encode()
    request = urllib.request.Request(ims.url + "/ims/invalidate_token/v2", data=form)
    with procs._OPENER.open(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture
def loaded(agent, ims):
    done = agent.cli("add", ims.credentials["service"], "--host", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    return agent


@pytest.mark.integration
def test_client_against_the_real_agent(loaded, ims):
    token = client.get_token(url=ims.url + "/aem/x", socket=loaded.sock)
    assert token.access_token == loaded.token().stdout.strip()
    assert token.profile == "p12345-e67890"
    assert token.client_id == "cm-p12345-e67890"
    assert (
        token.account
        == json.loads(Path(ims.credentials["service"]).read_text())["integration"]["id"]
    )
    assert ims.aem("/aem/content.json", token.headers())[0] == 200
    with pytest.raises(client.NoSuchProfile, match="no profile matches host github.com"):
        client.get_token(url="https://github.com/", socket=loaded.sock)
    assert client.force_refresh(token, socket=loaded.sock) is True
    assert client.get_token(token.profile, socket=loaded.sock).access_token != token.access_token
    assert client.force_refresh(token, socket=loaded.sock) is False


@pytest.mark.integration
def test_httpx_auth_refreshes_a_revoked_token(loaded, ims):
    auth = AemAgentAuth(socket=loaded.sock)
    with httpx.Client(auth=auth, trust_env=False) as http:
        first = http.get(ims.url + "/aem/content.json")
        assert (first.status_code, first.history) == (200, [])

        revoke(ims, first.request.headers["authorization"].removeprefix("Bearer "))
        second = http.get(ims.url + "/aem/content.json")
        assert second.status_code == 200
        assert [r.status_code for r in second.history] == [401]
        assert len(ims.requests("jwt")) == 2

        # The new token revoked too, within the minute: no second forced refresh, the 401 stands.
        revoke(ims, second.request.headers["authorization"].removeprefix("Bearer "))
        third = http.get(ims.url + "/aem/content.json")
        assert (third.status_code, third.history) == (401, [])
        assert len(ims.requests("jwt")) == 2


@pytest.mark.integration
async def test_async_httpx_auth_refreshes_a_revoked_token(loaded, ims):
    token = client.get_token(socket=loaded.sock)
    revoke(ims, token.access_token)
    async with httpx.AsyncClient(auth=AemAgentAuth(socket=loaded.sock), trust_env=False) as http:
        response = await http.get(ims.url + "/aem/content.json")
    assert response.status_code == 200
    assert [r.status_code for r in response.history] == [401]
    assert response.request.headers["authorization"] != f"Bearer {token.access_token}"


# --- the examples in docs/CALLERS.md, run as written ---------------------------------------------

CALLERS = Path(__file__).resolve().parents[2] / "docs" / "CALLERS.md"
EXAMPLE_HOST = "https://author-p12345-e67890.adobeaemcloud.com"


def example(name: str) -> str:
    """The fenced block after `<!-- example: NAME -->` in docs/CALLERS.md."""
    text = CALLERS.read_text()
    start = text.index(f"<!-- example: {name} -->")
    start = text.index("\n", text.index("```", start)) + 1
    return text[start : text.index("```", start)]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("python", [sys.executable, "-c"]),
        ("python-httpx", [sys.executable, "-c"]),
        ("sh", ["sh", "-c"]),
        ("node", ["node", "-e"]),
    ],
)
def test_callers_examples_run(loaded, ims, name, command):
    if shutil.which(command[0]) is None or (name == "sh" and shutil.which("curl") is None):
        pytest.skip(f"{command[0]} or curl is not installed")
    # The AEM host of the examples becomes the emulator's AEM stand-in (profile host 127.0.0.1).
    code = example(name).replace(EXAMPLE_HOST, ims.url + "/aem")
    env = {k: v for k, v in loaded.env.items() if "proxy" not in k.lower()}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    done = subprocess.run(
        [*command, code], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    if name == "sh":  # curl prints the AEM stand-in's body
        assert json.loads(done.stdout)["ok"] is True
    else:  # the status, then the body
        assert done.stdout.split()[0] == "200", done.stdout
