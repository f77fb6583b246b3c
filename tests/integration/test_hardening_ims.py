"""Hardening, part 2: IMS faults and clocks, end to end (issue 5, items 3 and 4).

The real daemon, the real IMS emulator with its fault injection, the CLIs as subprocesses. Each
daemon reads a config file with short timeouts and backoffs (`[agent] ims_timeout`,
`backoff_initial`, ...), so every fault plays out in a few seconds of real time, and so that a
broken defence shows as many IMS requests where there should be one.

Each test was seen to FAIL with its defence removed; the docstrings say how ("Broken: ...").
SECURITY.md lists them per property.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import procs
import pytest
from procs import wait_for

pytestmark = pytest.mark.integration

NAME = "p12345-e67890"  # the name derived from the emulator's service credential
AEM_HOST = "author-p12345-e67890.adobeaemcloud.com"  # a host that credential serves
IMS_SAYS = "invalid client_id and client_secret combination"  # the emulator's words

# Retries come fast (a broken defence then shows as many requests, not one) and a request waits
# a few seconds at most for IMS.
FAST = {"ims_timeout": 1.0, "backoff_initial": 0.1, "backoff_max": 0.3, "request_wait": 6.0}


def write_config(path: Path, **agent: float) -> Path:
    path.write_text("[agent]\n" + "".join(f"{key} = {value!r}\n" for key, value in agent.items()))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def fast_agent(
    directory: Path, env: dict[str, str] | None = None, **settings: float
) -> Iterator[procs.AgentProcess]:
    """A daemon (debug log) reading a config file with FAST settings, `settings` on top."""
    config = write_config(directory / "config.toml", **{**FAST, **settings})
    with procs.agent(directory, "--config", str(config), env=env) as agent:
        yield agent


def git_erase(agent: procs.AgentProcess, token: str) -> subprocess.CompletedProcess[str]:
    """What git runs when the server refused `token`: `aem-token erase`, attributes on stdin."""
    attributes = f"protocol=https\nhost={AEM_HOST}\nusername=x\npassword={token}\n\n"
    return procs.run(procs.aem_token("erase"), agent.env, stdin=attributes.encode())


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def client_of(token: str) -> str:
    """The client id inside an emulator token (JWT-shaped; read, not verified)."""
    payload = token.split(".")[1]
    return str(
        json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["client_id"]
    )


# ---- item 3: IMS faults


def test_429_with_retry_after_the_next_attempt_is_not_earlier(
    ims: procs.EmulatorProcess, tmp_path: Path
) -> None:
    """IMS throttles with `Retry-After: 2`; the backoff alone would retry within 0.3 s.

    Broken: `backoff_delay` ignoring `retry_after` (the retry comes ~0.1 s later)."""
    ims.fault(endpoint="jwt", count=1, status=429, retry_after=2)
    with fast_agent(tmp_path) as agent:
        added = agent.cli("add", ims.credentials["service"])
        assert added.returncode == 0, added.stderr
        assert "IMS is throttling token requests (HTTP 429)" in agent.log()
    first, second = ims.requests("jwt")
    assert (first["status"], second["status"]) == (429, 200)
    # Request log times are the emulator's arrival times: the retry came 2 s or more later.
    assert second["time"] - first["time"] >= 2.0


def test_an_ims_that_hangs_times_out_and_is_retried(
    ims: procs.EmulatorProcess, tmp_path: Path
) -> None:
    """The first exchange hangs for 5 s; `ims_timeout = 1` from the config file gives up on it
    after 1 s and the retry gets the token long before the hung answer would have come.

    Broken: IMSClient ignoring its `timeout` (a fixed 20 s in both `trio.fail_after` and the
    httpx client's timeout: either one alone still catches the hang) waits out the 5 s and
    makes one request only."""
    ims.fault(endpoint="jwt", count=1, delay=5)
    with fast_agent(tmp_path) as agent:
        began = time.monotonic()
        added = agent.cli("add", ims.credentials["service"])
        took = time.monotonic() - began
        assert added.returncode == 0, added.stderr
        assert took < 4.5, took
        assert [r["fault"] for r in ims.requests("jwt")] == [True, False]
        assert "did not answer within 1 s; retrying in" in agent.log()


@pytest.mark.parametrize(
    ("fault", "logged"),
    [
        ({"drop": True}, "could not reach IMS at"),
        ({"malformed": True}, "IMS answered 200 without a usable token; retrying in"),
    ],
    ids=["dropped-connection", "malformed-json"],
)
def test_dropped_connections_and_malformed_answers_are_retried(
    ims: procs.EmulatorProcess, tmp_path: Path, fault: dict[str, Any], logged: str
) -> None:
    """Two bad answers, then a good one: the token is served, the log says why it retried, and
    no traceback (the daemon's catch-all for bugs) was involved.

    Broken: without ims/client.py's `except httpx.HTTPError` the drop reaches the agent's
    catch-all (a traceback in the log); `grant_from_response` raising IMSPermanentError for an
    unusable 200 stops the retries (`add` exits 4)."""
    ims.fault(endpoint="jwt", count=2, **fault)
    with fast_agent(tmp_path) as agent:
        added = agent.cli("add", ims.credentials["service"])
        assert added.returncode == 0, added.stderr
        assert [r["fault"] for r in ims.requests("jwt")] == [True, True, False]
        log = agent.log()
        assert log.count(logged) == 2, log
        assert "Traceback" not in log
        assert agent.token().returncode == 0


def test_a_wrong_secret_is_refused_clearly_and_never_hammered(
    ims: procs.EmulatorProcess, tmp_path: Path
) -> None:
    """A credential with a wrong client secret: IMS's real `invalid_client` answer. One IMS
    request, whatever the callers do afterwards: repeated `aem-token`, git's `erase`, waiting.

    Then a profile that had a token and whose credential IMS starts refusing (deleted at Adobe):
    one forced refresh (git's erase), then nothing more from erase, from `--min-valid` requests
    or from the timer; the cached token still serves; only `aemagent refresh` tries again.

    Broken: `Schedule.may_fetch` ignoring `blocked` (every `--min-valid` call goes to IMS), or
    error_from_response calling a 4xx transient (retries every 0.1-0.3 s)."""
    document = json.loads(Path(ims.credentials["service"]).read_text())
    document["integration"]["technicalAccount"]["clientSecret"] = "p8e-" + "W" * 32
    wrong = tmp_path / "wrong-secret.json"
    wrong.write_text(json.dumps(document))
    wrong.chmod(0o600)
    with fast_agent(tmp_path) as agent:
        added = agent.cli("add", str(wrong), "--name", "wrong")
        assert added.returncode == 4
        line = one_line(added.stderr)
        assert "invalid_client" in line
        assert IMS_SAYS in line
        assert "W" * 16 not in line
        for _ in range(8):
            done = agent.token("--profile", "wrong")
            assert (done.returncode, done.stdout) == (4, "")
            assert IMS_SAYS in one_line(done.stderr)
            assert "aemagent refresh wrong" in done.stderr
            git_erase(agent, "some-token-git-had")
        time.sleep(1.5)  # a transient retry loop would have run 5 to 15 times by now
        assert len(ims.requests("jwt")) == 1
        assert agent.cli("forget", "wrong").returncode == 0  # git's host is this one's now

        added = agent.cli("add", ims.credentials["service"])
        assert added.returncode == 0, added.stderr
        token = agent.token("--profile", NAME).stdout.strip()
        ims.clear()
        ims.fault(
            endpoint="jwt",
            count=100,
            status=401,
            error="invalid_client",
            error_description=IMS_SAYS,
        )
        erased = git_erase(agent, token)  # the forced refresh, which IMS now refuses
        assert (erased.returncode, erased.stdout) == (4, "")
        assert IMS_SAYS in one_line(erased.stderr)
        assert len(ims.requests("jwt")) == 1
        for _ in range(8):
            git_erase(agent, token)
            # --min-valid 86400 (the whole lifetime) no fresh token can meet: a usage error,
            # decided without IMS (test_ims_hostile has the boundary).
            done = agent.token("--profile", NAME, "--min-valid", "86400")
            assert (done.returncode, done.stdout) == (64, "")
            assert "longer than a fresh token" in one_line(done.stderr)
        time.sleep(1.5)
        assert len(ims.requests("jwt")) == 1
        # The cached token is still valid, so it is still served.
        assert agent.token("--profile", NAME).stdout.strip() == token
        status = {
            p["name"]: p for p in json.loads(agent.cli("status", "--json").stdout)["profiles"]
        }
        assert status[NAME]["state"] == "failed"
        assert IMS_SAYS in status[NAME]["last_error"]
        # Only a manual refresh asks IMS again.
        refreshed = agent.cli("refresh", NAME)
        assert refreshed.returncode == 4
        assert IMS_SAYS in one_line(refreshed.stderr)
        assert len(ims.requests("jwt")) == 2


def test_an_unreachable_ims_the_cached_token_serves_while_valid_then_a_clear_error(
    tmp_path: Path,
) -> None:
    """Tokens live 8 s and are refreshed when half is left (`refresh_fraction = 0.5`), so the
    refresh is due from about 4 s before expiry. The emulator is killed right after the first
    fetch: the refreshes fail (connection refused), the cached token keeps being served while
    it has at least `--min-valid 1` left (also after the refresh came due), then a clear error.

    Broken: dropping the cached token on a failed refresh (`profile.token = None` in
    `Agent._failed`) stops serving as soon as the first refresh fails."""
    with (
        procs.emulator(tmp_path, "--token-lifetime", "8") as ims,
        fast_agent(tmp_path, refresh_fraction=0.5, refresh_jitter=0.01, request_wait=2.0) as agent,
    ):
        added = agent.cli("add", ims.credentials["service"])
        assert added.returncode == 0, added.stderr
        ims.proc.kill()
        ims.proc.wait()
        token, served, failed = None, [], None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = agent.token("--format", "json", "--min-valid", "1")
            if done.returncode != 0:
                failed = done
                break
            info = json.loads(done.stdout)
            token = token or info["access_token"]
            assert info["access_token"] == token  # never anything else
            assert info["expires_in"] >= 1
            assert info["expires_at"] - time.time() >= 0  # not expired
            served.append(info["expires_in"])
            time.sleep(0.2)
        assert failed is not None, "the token was served past its expiry"
        assert min(served) <= 2  # served well after its refresh came due (at 4 s) and failed
        assert (failed.returncode, failed.stdout) == (4, "")
        line = one_line(failed.stderr)
        assert f"profile {NAME}" in line
        assert "could not reach IMS at 127.0.0.1" in line
        assert "could not reach IMS" in agent.log()


@pytest.mark.parametrize("how", ["replaced", "forgotten-then-added"])
def test_a_profile_replaced_during_its_refresh_never_gets_the_old_identitys_token(
    ims: procs.EmulatorProcess, tmp_path: Path, how: str
) -> None:
    """`work` holds the service credential; its refresh is held up at IMS for 3 s; meanwhile
    `work` becomes the OAuth credential. The held-up answer (a token for the service identity)
    lands afterwards, and `work` must still serve only OAuth tokens. The `aemagent refresh`
    that was waiting says its profile went away, not "refreshed".

    Broken: applying a flight's result to whatever profile holds the name now
    (`self._profiles[profile.name]`) instead of the profile object it flew for, AND
    `Agent._drop` no longer cancelling the old profile's scope: each defence alone is enough.
    Without the check at the end of `Agent._await_flight`, the refresh says "refreshed"."""
    oauth_client = json.loads(Path(ims.credentials["oauth"]).read_text())["client_id"]
    with fast_agent(tmp_path, ims_timeout=10.0, request_wait=10.0) as agent:
        added = agent.cli("add", ims.credentials["service"], "--name", "work")
        assert added.returncode == 0, added.stderr
        old = agent.token("--profile", "work").stdout.strip()
        assert client_of(old) == "cm-p12345-e67890"
        ims.fault(endpoint="jwt", count=1, delay=3)
        refresher = subprocess.Popen(
            procs.aemagent("refresh", "work"),
            env=agent.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: len(ims.requests("jwt")) == 2, 10, "the refresh to reach IMS")
            if how == "forgotten-then-added":
                assert agent.cli("forget", "work").returncode == 0
            added = agent.cli("add", ims.credentials["oauth"], "--name", "work")
            assert added.returncode == 0, added.stderr
            out, err = refresher.communicate(timeout=20)
        finally:
            if refresher.poll() is None:
                refresher.kill()
                refresher.communicate()
        assert (refresher.returncode, out) == (4, "")
        assert "forgotten or replaced" in one_line(err)
        # Past the moment the held-up answer came back from IMS:
        wait_for(lambda: ims.requests("jwt")[1]["status"] is not None, 10, "the held-up answer")
        time.sleep(0.3)
        for _ in range(3):
            info = json.loads(agent.token("--profile", "work", "--format", "json").stdout)
            assert info["client_id"] == oauth_client
            assert client_of(info["access_token"]) == oauth_client
            assert info["access_token"] != old
            status, body = ims.aem("/aem/x", {"Authorization": f"Bearer {info['access_token']}"})
            assert (status, json.loads(body)["client_id"]) == (200, oauth_client)
        (row,) = json.loads(agent.cli("status", "--json").stdout)["profiles"]
        assert (row["name"], row["kind"]) == ("work", "oauth")


@contextlib.contextmanager
def eavesdropper() -> Iterator[tuple[str, list[bytes]]]:
    """A loopback HTTP server that keeps whatever it is sent and answers 500: where a followed
    redirect would carry the client secret."""
    received: list[bytes] = []
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        data += chunk
                        if b"\r\n\r\n" in data:
                            break
                received.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(
                        b"HTTP/1.1 500 No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", received
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_redirect_from_ims_is_not_followed(ims: procs.EmulatorProcess, tmp_path: Path) -> None:
    """IMS (or something posing as it) answers 307/308 pointing elsewhere: a client following
    it would re-send the POST body (client secret, signed JWT) there. The agent treats it as
    an unexpected answer, retries IMS itself, and the other server never hears from it.

    Broken: `follow_redirects=True` in IMSClient._client_for sends the body to the other
    server."""
    with eavesdropper() as (elsewhere, received), fast_agent(tmp_path) as agent:
        ims.fault(endpoint="jwt", count=1, status=307, location=f"{elsewhere}/ims/exchange/jwt")
        ims.fault(endpoint="token", count=1, status=308, location=f"{elsewhere}/ims/token/v3")
        for kind in ("service", "oauth"):
            added = agent.cli("add", ims.credentials[kind])
            assert added.returncode == 0, added.stderr
        assert [r["status"] for r in ims.requests("jwt")] == [307, 200]
        assert [r["status"] for r in ims.requests("token")] == [308, 200]
        # No wait needed: a followed redirect would have reached the eavesdropper, which keeps
        # what it is sent before it answers, before the agent's retry got the 200 above.
        assert received == []
        log = agent.log()
        assert "IMS answered with an unexpected HTTP 307" in log
        assert "IMS answered with an unexpected HTTP 308" in log


# ---- item 4: clocks


def test_clock_skew_that_the_retry_cannot_fix_says_clock_skew(
    ims: procs.EmulatorProcess, tmp_path: Path
) -> None:
    """IMS keeps saying the JWT expired: exactly one skew-corrected retry, then an error that
    says "clock skew", and no more attempts. (The retry that succeeds is in test_e2e.)

    Broken: without the retry in `_exchange_jwt`, IMS sees one request, not two."""
    said = "JWT expired 7200 s ago by IMS's clock"
    ims.fault(endpoint="jwt", count=10, status=400, error="invalid_token", error_description=said)
    with fast_agent(tmp_path) as agent:
        added = agent.cli("add", ims.credentials["service"])
        assert added.returncode == 4
        line = one_line(added.stderr)
        assert "clock skew" in line
        assert said in line
        assert agent.token().returncode == 4
        time.sleep(0.5)
        assert len(ims.requests("jwt")) == 2


def _libfaketime() -> str | None:
    for pattern in (
        "/usr/lib/*/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
        "/usr/lib64/faketime/libfaketime.so.1",
        "/usr/local/lib/faketime/libfaketime.so.1",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


LIBFAKETIME = _libfaketime()


@pytest.mark.skipif(
    LIBFAKETIME is None or not sys.platform.startswith("linux"),
    reason="libfaketime (Debian package faketime) is not installed",
)
def test_a_wall_clock_jump_under_real_faketime_serves_no_expired_token(
    ims: procs.EmulatorProcess, tmp_path: Path
) -> None:
    """The daemon runs under libfaketime; rewriting its timestamp file jumps its wall clock 25 h
    forward (a laptop that slept through the day) while its monotonic and boot clocks go on
    (FAKETIME_DONT_FAKE_MONOTONIC=1, trio's timers never notice). The emulator's clock moves the
    same 25 h, so the old token is really expired at IMS and AEM.

    Then: `status` shows it expired; with IMS failing, no call gets the old token (a clear error
    instead, after IMS was asked at once); with IMS back, a fresh token is fetched at once.

    Broken: `TokenTimes.remaining` reading only the boot clock serves the expired token."""
    assert LIBFAKETIME is not None
    jump = 25 * 3600
    stamp = tmp_path / "faketime.rc"
    stamp.write_text("+0\n")
    faked = {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(stamp),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    with fast_agent(tmp_path, env=faked, request_wait=3.0) as agent:
        # The CLIs run with the real clock: only the daemon's is faked.
        env = {k: v for k, v in agent.env.items() if k not in faked}

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return procs.run(procs.aemagent(*args), env)

        def token(*args: str) -> subprocess.CompletedProcess[str]:
            return procs.run(procs.aem_token(*args), env)

        with open(f"/proc/{agent.pid}/environ", "rb") as f:
            assert f"LD_PRELOAD={LIBFAKETIME}".encode() in f.read().split(b"\0")
        assert cli("add", ims.credentials["service"]).returncode == 0
        old = json.loads(token("--format", "json").stdout)
        assert old["expires_in"] > 86000

        stamp.write_text(f"+{jump}\n")
        ims.http("POST", "/_emulator/clock", {"offset": jump})
        (row,) = json.loads(cli("status", "--json").stdout)["profiles"]
        assert row["state"] == "expired"
        assert row["expires_in"] == 0
        assert row["expires_at"] <= time.time() + jump
        assert ims.aem("/aem/x", {"Authorization": f"Bearer {old['access_token']}"})[0] == 401

        ims.fault(endpoint="jwt", count=1000, status=503)
        began = len(ims.requests("jwt"))
        done = token("--format", "json")
        assert (done.returncode, done.stdout) == (4, "")
        assert "IMS is unavailable (HTTP 503)" in one_line(done.stderr)
        assert len(ims.requests("jwt")) > began  # asked IMS at once, not at the next timer

        ims.http("DELETE", "/_emulator/faults")
        started = time.monotonic()
        done = token("--format", "json")
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 3
        new = json.loads(done.stdout)
        assert new["access_token"] != old["access_token"]
        assert new["expires_at"] == pytest.approx(time.time() + jump + 86400, abs=30)
        assert new["expires_in"] > 86000
        assert ims.aem("/aem/x", {"Authorization": f"Bearer {new['access_token']}"})[0] == 200
        assert "Traceback" not in agent.log()
