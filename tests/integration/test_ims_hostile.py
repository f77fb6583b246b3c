"""What a hostile (or broken) IMS can send, and what the agent makes of it.

Unit tests drive `IMSClient` through httpx.MockTransport (the FakeIMS of test_ims); integration
tests run the real daemon against the emulator's fault hooks over loopback. Each was seen to FAIL
with its defence removed; the docstrings say how ("Broken: ...").
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import cast
from urllib.parse import quote, quote_plus

import httpx
import jwt
import procs
import pytest
from imsfake import IMS_NOW, FakeIMS, credential, form, oauth
from keys import ims_token

from aemagent.core.clocks import FakeClock
from aemagent.emulator.faults import Fault
from aemagent.emulator.tokens import Refusal
from aemagent.errors import ClockSkewError, IMSPermanentError, IMSTransientError
from aemagent.ims import LIFETIME_CAP, error_from_response

DAY = 86400.0
NAME = "p12345-e67890"  # the name derived from the emulator's service credential


def opaque(expires_in: object) -> httpx.Response:
    return httpx.Response(200, json={"access_token": "opaque-token", "expires_in": expires_in})


# ---- item 2: a lifetime too short to use -----------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expires_in", "shown"),
    [
        ("service", 0.001, "1e-06"),  # ms at the JWT exchange
        ("oauth", 0.001, "0.001"),  # s at /ims/token/v3
        ("oauth", "1e-9", "1e-09"),
        ("oauth", 59, "59"),
    ],
)
async def test_a_lifetime_too_short_to_use_is_a_transient_ims_error(kind, expires_in, shown):
    """Broken: without the minimum in `grant_from_response`, the grant is returned, and the agent
    refreshes it at once, again and again (~400 IMS requests a second)."""
    ims = FakeIMS()
    ims.answers.append(opaque(expires_in))
    async with ims.client() as client:
        with pytest.raises(IMSTransientError) as info:
            await client.fetch(credential() if kind == "service" else oauth())
    assert str(info.value) == f"IMS answered with a token valid for only {shown} s, less than 60 s"


async def test_a_loopback_ims_may_answer_short_tokens_down_to_5_s():
    ims = FakeIMS()
    ims.answers += [opaque(5), opaque(4.9)]
    loopback = oauth(ims_endpoint="http://127.0.0.1:8080")
    async with ims.client() as client:
        assert (await client.fetch(loopback)).lifetime == 5.0
        with pytest.raises(IMSTransientError, match="valid for only 4.9 s, less than 5 s"):
            await client.fetch(loopback)


# ---- item 5: trust in IMS's numbers ------------------------------------------------------------


async def test_an_opaque_token_living_41_days_is_believed_for_25_hours(caplog):
    """Broken: without LIFETIME_CAP, 3,600,000 s (seconds at /ims/token/v3) is kept 41 days."""
    ims = FakeIMS()
    ims.answers.append(opaque(3_600_000))
    with caplog.at_level(logging.WARNING, logger="aemagent.ims"):
        async with ims.client() as client:
            grant = await client.fetch(oauth())
    assert grant.lifetime == LIFETIME_CAP == 25 * 3600
    assert "IMS says a token lives 3600000 s; believing at most 90000 s" in caplog.text
    assert "opaque-token" not in caplog.text


async def test_a_jwt_token_saying_it_lives_41_days_is_believed_for_25_hours():
    ims = FakeIMS()
    created = str(int(IMS_NOW * 1000))
    ims.token = ims_token({"created_at": created, "expires_in": str(3_600_000 * 1000)})
    async with ims.client() as client:
        assert (await client.fetch(credential())).lifetime == LIFETIME_CAP


@pytest.mark.parametrize("send_date", [True, False])
async def test_a_token_created_two_days_ago_is_not_served_as_fresh(send_date):
    """Broken: without `_left_by_created_at`, the grant says 24 h although the token's own
    created_at + expires_in ended a day ago."""
    ims = FakeIMS(send_date=send_date)
    old = str(int((IMS_NOW - 2 * DAY) * 1000))
    ims.token = ims_token({"created_at": old, "expires_in": "86400000"})
    async with ims.client() as client:
        with pytest.raises(IMSTransientError) as info:
            await client.fetch(credential())
    assert str(info.value) == (
        "IMS answered with a token that has expired already (by its created_at)"
    )


async def test_an_hour_old_token_has_23_hours_left(caplog):
    ims = FakeIMS()
    ims.token = ims_token(
        {"created_at": str(int((IMS_NOW - 3600) * 1000)), "expires_in": "86400000"}
    )
    with caplog.at_level(logging.WARNING, logger="aemagent.ims"):
        async with ims.client() as client:
            grant = await client.fetch(credential())
    assert grant.lifetime == DAY - 3600
    assert "created_at is 3600 s old; it has 82800 s left" in caplog.text


async def test_a_fresh_token_is_fresh_whatever_this_machines_clock_says():
    """Age is read on IMS's clock (its Date): a clock here two days ahead or behind does not make
    a token IMS just made look old."""
    for offset in (2 * DAY, -2 * DAY):
        ims = FakeIMS()  # created_at and Date are both IMS_NOW
        ims.answers.append(
            httpx.Response(200, json={"access_token": ims.token, "expires_in": 86399999})
        )
        async with ims.client(FakeClock(wall=IMS_NOW + offset)) as client:
            assert (await client.fetch(oauth())).lifetime == 86399.999


# ---- item 3: a clock more than a day ahead ----------------------------------------------------

AHEAD = "JWT exp claim is more than 24 hours ahead"  # the emulator's words


def refuse_ahead(request: httpx.Request) -> httpx.Response:
    body = {"error": "invalid_token", "error_description": AHEAD}
    return httpx.Response(400, json=body)


def exp_of(request: httpx.Request) -> int:
    assertion = form(request)["jwt_token"][0]
    return cast("int", jwt.decode(assertion, options={"verify_signature": False})["exp"])


async def test_a_clock_two_days_ahead_is_corrected_by_ims_date(caplog):
    """Broken: with `_jwt_expired` matching only "expire", the answer is permanent and the
    profile stays failed after the clock is fixed; IMS sees one request."""
    ims = FakeIMS()
    ims.answers.append(refuse_ahead)
    clock = FakeClock(wall=IMS_NOW + 2 * DAY)
    with caplog.at_level(logging.WARNING, logger="aemagent.ims"):
        async with ims.client(clock) as client:
            grant = await client.fetch(credential())
    assert grant.lifetime == 86399.999
    assert len(ims.requests) == 2
    assert exp_of(ims.requests[0]) == IMS_NOW + 2 * DAY + 300
    assert exp_of(ims.requests[1]) == IMS_NOW + 300  # on IMS's clock
    assert "retrying once on IMS's clock (+172800 s off)" in caplog.text


async def test_a_clock_ahead_that_the_retry_cannot_fix_says_clock_skew():
    ims = FakeIMS()
    ims.answers += [refuse_ahead, refuse_ahead]
    async with ims.client(FakeClock(wall=IMS_NOW + 2 * DAY)) as client:
        with pytest.raises(ClockSkewError) as info:
            await client.fetch(credential())
    assert len(ims.requests) == 2
    text = str(info.value)
    assert text.startswith("IMS says the JWT is from the future (HTTP 400)")
    assert "clock skew: this machine's clock differs from IMS's by 172800 s" in text
    assert "\n" not in text


async def test_a_clock_ahead_without_ims_date_says_clock_skew_at_once():
    ims = FakeIMS(send_date=False)
    ims.answers.append(refuse_ahead)
    async with ims.client(FakeClock(wall=IMS_NOW + 2 * DAY)) as client:
        with pytest.raises(ClockSkewError, match="IMS sent no Date to compare"):
            await client.fetch(credential())
    assert len(ims.requests) == 1


# ---- item 4: redaction of any percent-encoding ------------------------------------------------

SECRET = "p8e-Ab_c~d e+f/é.9"


def encoded_every_char(text: str, *, lower: bool = False) -> str:
    out = "".join(f"%{b:02X}" for b in text.encode())
    return out.lower() if lower else out


VARIANTS = [
    SECRET,
    quote_plus(SECRET),  # what the form carried
    quote(SECRET, safe=""),  # %20 for the space
    quote_plus(SECRET).replace("-", "%2D"),  # `-` encoded too
    quote_plus(SECRET).replace("-", "%2d").lower(),  # lower-case hex (and letters)
    quote_plus(SECRET).replace("%2F", "%2f").replace("%C3%A9", "%c3%a9"),
    encoded_every_char(SECRET),
    encoded_every_char(SECRET, lower=True),
    "p8e%2DAb_c~d+e%2Bf%2F%C3%A9.9",  # mixed: some raw, some encoded
]


@pytest.mark.parametrize("echoed", VARIANTS)
async def test_a_secret_echoed_in_any_percent_encoding_is_redacted(echoed):
    """Broken: the old `str.replace` of the secret and its quote_plus form lets `p8e%2D...`,
    lower-case hex, every-char escapes and %20-for-space through."""
    ims = FakeIMS()
    said = f"bad client_secret={echoed}&x=1 ({echoed})"
    answer = httpx.Response(
        401,
        json={"error": echoed[:60], "error_description": said},
        headers={"X-Debug-Id": f"dbg-{echoed}"} if echoed.isascii() else {},
    )
    ims.answers.append(answer)
    async with ims.client() as client:
        with pytest.raises(IMSPermanentError) as info:
            await client.fetch(oauth(client_secret=SECRET))
    shown = " ".join(
        str(x) for x in (info.value, info.value.description, info.value.debug_id, info.value.error)
    )
    assert "<redacted>" in shown
    assert "bad client_secret=<redacted>&x=1 (<redacted>)" in shown
    for leak in ("Ab_c", "Ab%5Fc", "Ab%5fc", "%41%62", "%41%62".lower()):
        assert leak not in shown
    # the answer was about that secret: the form IMS got carried it
    assert form(ims.requests[0])["client_secret"] == [SECRET]


def test_redaction_leaves_other_text_alone():
    response = httpx.Response(
        400, json={"error": "invalid_client", "error_description": "p8e%2D is a prefix, +x-"}
    )
    error = error_from_response(response, now_wall=IMS_NOW, redact=(SECRET,))
    assert error.description == "p8e%2D is a prefix, +x-"


# ---- integration: the real daemon, the emulator's fault hooks ----------------------------------


def write_config(path: Path, **agent: float) -> Path:
    path.write_text("[agent]\n" + "".join(f"{key} = {value!r}\n" for key, value in agent.items()))
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def configured_agent(directory: Path, **settings: float) -> Iterator[procs.AgentProcess]:
    config = write_config(directory / "config.toml", **settings)
    with procs.agent(directory, "--config", str(config)) as agent:
        yield agent


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def health(sock: str, timeout: float) -> bytes:
    return procs.raw_exchange(
        sock, b"GET /v1/health HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n\r\n", timeout
    )


def gzip_of_gzip(mib: int) -> bytes:
    """`mib` MiB of zeros, gzipped twice: a couple of KiB. Built from one full-flushed deflate
    block repeated (the same bytes each time), so it takes a second, not a minute."""
    pack = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = bytes(1 << 20)
    first = pack.compress(zeros) + pack.flush(zlib.Z_FULL_FLUSH)
    block = pack.compress(zeros) + pack.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)
    inner = header + first + block * (mib - 1) + pack.flush() + trailer
    outer = zlib.compressobj(9, zlib.DEFLATED, 31)
    return outer.compress(inner) + outer.flush()


@pytest.mark.integration
@pytest.mark.skipif(sys.platform != "linux", reason="reads the daemon's VmHWM from /proc")
def test_a_gzip_bomb_from_ims_is_refused_unread(ims: procs.EmulatorProcess, tmp_path: Path):
    """A few KiB with `Content-Encoding: gzip, gzip` inflating to 512 MiB, answered to every
    exchange. The daemon asks for identity and refuses the coding before reading: its memory
    high-water mark stays small, health answers meanwhile, and the error is one line.

    Broken: reading with `aiter_bytes()` (httpx decompresses each chunk whole) takes the
    daemon's VmHWM past 512 MB on the first answer."""
    bomb = gzip_of_gzip(512)
    assert len(bomb) < 8192
    ims.fault(
        endpoint="jwt",
        count=4,
        raw_body_b64=base64.b64encode(bomb).decode(),
        headers={"Content-Encoding": "gzip, gzip", "Content-Type": "application/json"},
    )
    with configured_agent(
        tmp_path, ims_timeout=5.0, backoff_initial=0.2, backoff_max=0.5, request_wait=3.0
    ) as agent:
        before = vm_hwm_kib(agent.pid)
        adding = subprocess.Popen(
            procs.aemagent("add", ims.credentials["service"]),
            env=agent.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        answers = []
        try:
            while adding.poll() is None:
                answers.append(health(agent.sock, timeout=5.0))
                time.sleep(0.05)
            out, err = adding.communicate(timeout=30)
        finally:
            if adding.poll() is None:
                adding.kill()
                adding.wait()
        assert all(a.startswith(b"HTTP/1.1 200") for a in answers), answers[:3]
        assert vm_hwm_kib(agent.pid) < max(200 * 1024, before + 100 * 1024)
        served = [r for r in ims.requests("jwt") if r["fault"]]
        assert served, "the bomb was never served"
        said = "answered with Content-Encoding gzip, gzip although identity was asked"
        if adding.returncode == 0:  # the faults ran out within request_wait: retried, then fine
            assert len(served) == 4
        else:
            assert adding.returncode == 4, (out, err)
            assert said in one_line(err)
        assert said in agent.log()
        assert health(agent.sock, timeout=5.0).startswith(b"HTTP/1.1 200")


@pytest.mark.integration
def test_a_tiny_expires_in_is_retried_with_backoff_not_hundreds_of_times(
    ims: procs.EmulatorProcess, tmp_path: Path
):
    """Every exchange answers a token living 0.001 ms. Over a 3 s window the daemon makes a
    handful of IMS requests (backoff from 1 s), not hundreds, and says why in one line.

    Broken: without the minimum lifetime in `grant_from_response`, each token is due at once:
    about 400 exchanges a second, a log line each."""
    body = json.dumps({"access_token": "opaque-token", "expires_in": 0.001})
    ims.fault(endpoint="jwt", count=1000, status=200, body=body)
    with configured_agent(tmp_path, request_wait=2.0) as agent:
        added = agent.cli("add", ims.credentials["service"])
        assert added.returncode == 4, added.stderr
        line = one_line(added.stderr)
        assert "IMS answered with a token valid for only 1e-06 s, less than 5 s" in line
        window = time.monotonic() + 3.0
        while time.monotonic() < window:
            time.sleep(0.25)
        assert 1 <= len(ims.requests("jwt")) <= 6
        assert agent.log().count("valid for only") <= 6


@pytest.mark.integration
def test_a_clock_two_days_ahead_of_ims_gets_a_token_with_one_retry(
    ims: procs.EmulatorProcess, agent: procs.AgentProcess
):
    """IMS two days behind us: our JWT's exp is "more than 24 hours ahead" by IMS's clock.
    One retry on IMS's Date gets the token, and the token is fresh (its created_at is IMS's).

    Broken: with the retry only for "expired", `add` exits 4 with a permanent error, and the
    profile stays failed after the clock is fixed."""
    ims.http("POST", "/_emulator/clock", {"offset": -2 * DAY})
    added = agent.cli("add", ims.credentials["service"])
    assert added.returncode == 0, added.stderr
    seen = ims.requests("jwt")
    assert [r["status"] for r in seen] == [400, 200]
    assert seen[1]["jwt"]["claims"]["exp"] - seen[0]["jwt"]["claims"]["exp"] == pytest.approx(
        -2 * DAY, abs=5
    )
    info = json.loads(agent.token("--format", "json").stdout)
    assert info["expires_in"] > DAY - 120
    status, _ = ims.aem("/aem/x", {"Authorization": f"Bearer {info['access_token']}"})
    assert status == 200


@pytest.mark.integration
def test_min_valid_at_the_lifetime_is_a_usage_error_without_ims_calls(
    ims: procs.EmulatorProcess, agent: procs.AgentProcess
):
    """`--min-valid 86400` (a fresh token's whole lifetime) can never be met: 5 calls, 5 times exit
    64, at most one exchange at IMS.

    Broken: with `requested > lifetime` as the only test in `effective_min_valid`, each call
    fetches a token and then fails with exit 4: 5 calls, 5 exchanges."""
    added = agent.cli("add", ims.credentials["service"])
    assert added.returncode == 0, added.stderr
    ims.http("DELETE", "/_emulator/stats")
    for _ in range(5):
        done = agent.token("--min-valid", "86400")
        assert (done.returncode, done.stdout) == (64, "")
        line = one_line(done.stderr)
        assert "min_valid 86400 s is longer than a fresh token is valid when served" in line
        assert line.endswith("less 1 s for fetching it; ask for less than 86399 s")
    assert ims.http("GET", "/_emulator/stats")["exchanges"] <= 1
    assert agent.token("--min-valid", "86000").returncode == 0  # served, no new token


# ---- the emulator's raw-answer fault ---------------------------------------------------------


async def test_the_raw_body_fault_answers_exactly_those_bytes_and_headers():
    raw = bytes(range(256))
    _, _, fault = Fault.parse(
        {
            "endpoint": "jwt",
            "raw_body_b64": base64.b64encode(raw).decode(),
            "headers": {"Content-Encoding": "gzip, gzip", "Content-Type": "text/plain"},
        }
    )
    answer = await fault.apply()
    assert answer is not None
    assert (answer.status, answer.body, answer.content_type) == (200, raw, "text/plain")
    assert answer.headers == (("Content-Encoding", "gzip, gzip"),)


@pytest.mark.parametrize(
    ("obj", "said"),
    [
        ({"raw_body_b64": "not base64!"}, "raw_body_b64 must be a base64 string"),
        ({"raw_body_b64": 5}, "raw_body_b64 must be a base64 string"),
        ({"headers": {"X": 1}}, "headers must be an object of strings"),
        ({"headers": ["X"]}, "headers must be an object of strings"),
        ({"headers": {"Content-Length": "5"}}, "headers must not set content-length"),
        ({"raw_body": "x"}, "unknown fault keys: raw_body"),
    ],
)
def test_the_raw_body_fault_is_parsed_strictly(obj, said):
    with pytest.raises(Refusal) as info:
        Fault.parse(obj)
    assert info.value.description == said
