"""Races between adds, flights and manual refreshes, and what a refresh that fails tells the user.

Unit tests run the real `Agent` on trio's MockClock with the fake IMS; the integration tests run
the real daemon and the IMS emulator over loopback.
"""

from __future__ import annotations

import json
import time
from contextlib import asynccontextmanager
from functools import partial

import procs
import pytest
import trio
from fakes import FakeCredential, FakeIMS, FixedRandom, LinkedClock

from aemagent.core.agent import Agent
from aemagent.errors import IMSTransientError, UnavailableError, UsageError


@pytest.fixture
def clock() -> LinkedClock:
    return LinkedClock()


@pytest.fixture
def fake_ims(clock: LinkedClock) -> FakeIMS:
    return FakeIMS(clock)


@asynccontextmanager
async def running(ims: FakeIMS, clock: LinkedClock):
    async with trio.open_nursery() as nursery:
        agent = Agent(ims, clock=clock, rng=FixedRandom(0.0))
        await nursery.start(agent.run)
        yield agent
        nursery.cancel_scope.cancel()


def live_profile_tasks(agent: Agent) -> int:
    """Profiles whose tasks still run: each is one child of the agent's nursery."""
    assert agent._nursery is not None
    return len(agent._nursery.child_tasks)


async def watch_an_hour(ims: FakeIMS, bound: int) -> None:
    """An idle virtual hour, a minute at a time, failing as soon as IMS is called too often
    (a storm would otherwise make thousands of calls before the hour is over)."""
    for _ in range(60):
        await trio.sleep(60)
        assert len(ims.calls) <= bound, f"{len(ims.calls)} IMS calls while idle"


@pytest.mark.parametrize("same_credential", [True, False])
async def test_concurrent_adds_of_one_name_leave_one_profile_and_no_storm(
    autojump_clock, clock, fake_ims, same_credential
):
    """Four adds of one name at once, three times. Broken: each add read the holder of the name
    before starting the profile's tasks, so a profile published meanwhile was overwritten without
    being dropped; its fetch results were discarded, its refresh stayed due, and it called IMS
    nonstop, invisible to `status` and `forget --all`."""
    async with running(fake_ims, clock) as agent:
        for round_ in range(3):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    digest = "digest-1" if same_credential else f"digest-{round_}-{i}"
                    credential = FakeCredential(digest=digest)
                    nursery.start_soon(partial(agent.add, credential, name="x"))
        await watch_an_hour(fake_ims, bound=12)
        assert [p.name for p in agent.profiles()] == ["x"]
        assert live_profile_tasks(agent) == 1
        if same_credential:
            assert len(fake_ims.calls) == 1  # one credential, one token: the adds were one add
        served = await agent.token(name="x")
        assert served.profile is agent.find("x")
        agent.forget_all()
        await trio.sleep(1)
        assert live_profile_tasks(agent) == 0
        calls = len(fake_ims.calls)
        await trio.sleep(3600)
        assert len(fake_ims.calls) == calls


async def test_add_replacing_a_profile_mid_flight_drops_it_with_its_tasks(
    autojump_clock, clock, fake_ims
):
    """A flight whose profile was replaced: its result is discarded and never causes a refetch,
    whether the replacement came from `add` or from `add_unloaded` (a config reload)."""
    fake_ims.latency = 5.0
    async with running(fake_ims, clock) as agent:
        await agent.add(FakeCredential(digest="a"), name="x")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: agent.add(FakeCredential(digest="b"), name="x"))
            nursery.start_soon(lambda: agent.add(FakeCredential(digest="c"), name="x"))
            await trio.sleep(1)  # the adds' fetches are in flight
            agent.add_unloaded("x", "its credential is still being read")
        await agent.add(FakeCredential(digest="d"), name="x")
        await watch_an_hour(fake_ims, bound=6)
        assert live_profile_tasks(agent) == 1
        assert agent.resolve("x").credential.digest == "d"


async def test_a_discarded_flight_result_ends_its_profile(autojump_clock, clock, fake_ims):
    """Defence in depth: a profile that lost its name without being dropped (as the add race
    above once did) ends with its next flight, instead of refetching at once forever."""
    fake_ims.latency = 5.0
    async with running(fake_ims, clock) as agent:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: agent.add(FakeCredential(), name="x"))
            await trio.sleep(1)  # its first fetch is in flight
            del agent._table._profiles["x"]  # lost without `_drop`: nothing cancels its tasks
        await watch_an_hour(fake_ims, bound=1)
        assert live_profile_tasks(agent) == 0


# ---- a manual refresh that meets a transient IMS error


def transient() -> IMSTransientError:
    return IMSTransientError("IMS is unavailable (503 Service Unavailable)", http_status=503)


async def test_a_manual_refresh_that_fails_transiently_retries_in_the_background(
    autojump_clock, clock, fake_ims
):
    """Broken: the manual refresh reported the 503 and then nothing retried it, because the old
    token was not yet due for its scheduled refresh."""
    async with running(fake_ims, clock) as agent:
        await agent.add(FakeCredential())
        first = (await agent.token()).token.reveal()
        fake_ims.script = [transient(), transient()]
        with pytest.raises(UnavailableError) as info:
            await agent.refresh("p1-e2")
        message = str(info.value)
        assert message.startswith("profile p1-e2: IMS is unavailable (503 Service Unavailable)")
        assert "the current token stays valid for 23h 59m" in message
        assert "the agent retries in the background" in message
        # backoff: 1 s, then up to 2 s; then the refresh asked for succeeds
        await trio.sleep(30)
        assert len(fake_ims.calls) == 4
        second = (await agent.token()).token.reveal()
        assert second != first
        await trio.sleep(3600)  # done: no more retries
        assert len(fake_ims.calls) == 4


async def test_a_manual_refresh_without_a_valid_token_says_when_it_retries(
    autojump_clock, clock, fake_ims
):
    async with running(fake_ims, clock) as agent:
        fake_ims.script = [transient(), transient()]
        await agent.add(FakeCredential())
        await trio.sleep(0.5)  # the first fetch failed; a retry is due in 1 s
        with pytest.raises(
            UnavailableError,
            match=r"there is no valid token and the agent retries in the background \(next attempt in 1s\)",
        ):
            await agent.refresh("p1-e2")
        await trio.sleep(30)
        assert (await agent.token()).token.reveal().startswith("token-")


# ---- a development token from the config file


async def test_refresh_of_a_config_dev_token_advises_updating_its_source(
    autojump_clock, clock, fake_ims
):
    from keys import dev_token

    from aemagent.credentials import parse_credential

    now_ms = clock.now().wall * 1000
    token = parse_credential(dev_token(created_at=str(int(now_ms)), expires_in=str(86400_000)))
    async with running(fake_ims, clock) as agent:
        await agent.add(token, name="fromfile", source="config")
        await agent.add(token, name="byhand")
        with pytest.raises(UsageError) as info:
            await agent.refresh("fromfile")
        assert "update its source, then `aemagent reload`" in str(info.value)
        assert "download a new one" in str(info.value)
        assert "add it again" not in str(info.value)
        with pytest.raises(UsageError, match="download a new one .* and add it again"):
            await agent.refresh("byhand")
        await trio.sleep(86400)
        with pytest.raises(UnavailableError, match=r"update its source, then `aemagent reload`"):
            await agent.token(name="fromfile")


# ---- against the real daemon and the emulator


def emulator_exchanges(ims: procs.EmulatorProcess) -> int:
    return int(ims.http("GET", "/_emulator/stats")["exchanges"])


def _held_adds(sock: str, body: bytes, count: int) -> list[bytes]:
    """`count` adds on as many connections, each sent but for its last byte, then all released
    at once: they reach the agent in one go, as `aemagent add … &` four times may."""
    import socket

    head = (
        "POST /v1/profiles HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    conns = []
    try:
        for _ in range(count):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conns.append(conn)
            conn.settimeout(procs.STEP_TIMEOUT)
            conn.connect(sock)
            conn.sendall(head + body[:-1])
        time.sleep(0.2)  # the agent has read all but the last byte of each
        for conn in conns:
            conn.sendall(body[-1:])
        answers = []
        for conn in conns:
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            answers.append(received)
        return answers
    finally:
        for conn in conns:
            conn.close()


def test_concurrent_adds_leave_one_profile_and_an_idle_agent(agent, ims):
    """`aemagent add F --name x &` four times at once, three times, by the CLI and by requests
    released together. Broken: afterwards the idle agent called IMS hundreds of times a second
    for profiles `status` did not show, and `forget --all` did not stop it."""
    import subprocess

    credential = ims.credentials["oauth"]
    for _ in range(3):
        adds = [
            subprocess.Popen(
                procs.aemagent("add", credential, "--name", "x"),
                env=agent.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(4)
        ]
        for add in adds:
            assert add.wait(timeout=procs.STEP_TIMEOUT) == 0
    # A service credential: checking its key takes the agent long enough that the
    # other requests arrive, so that several adds are under way at once.
    with open(ims.credentials["service"]) as f:
        body = json.dumps({"credential": json.load(f), "name": "x"}).encode()
    for _ in range(3):
        answers = _held_adds(agent.sock, body, 4)
        assert all(a.startswith(b"HTTP/1.1 201 ") for a in answers), answers
    before = emulator_exchanges(ims)
    time.sleep(3)  # idle: nothing is due
    assert emulator_exchanges(ims) - before <= 2
    rows = json.loads(agent.cli("status", "--json").stdout)["profiles"]
    assert [row["name"] for row in rows] == ["x"]
    assert agent.cli("forget", "--all").returncode == 0
    before = emulator_exchanges(ims)
    time.sleep(2)
    assert emulator_exchanges(ims) == before


def test_a_manual_refresh_meeting_a_503_retries_in_the_background(agent, ims):
    done = agent.cli("add", ims.credentials["service"], "--name", "svc")
    assert done.returncode == 0, done.stderr
    first = json.loads(agent.cli("status", "--json").stdout)["profiles"][0]["token_fingerprint"]
    assert first
    ims.fault(endpoint="jwt", status=503, count=1)
    done = agent.cli("refresh", "svc")
    assert done.returncode != 0
    assert "503" in done.stderr
    assert "the current token stays valid for" in done.stderr
    assert "the agent retries in the background" in done.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = json.loads(agent.cli("status", "--json").stdout)["profiles"][0]
        if row["token_fingerprint"] != first and row["state"] == "valid":
            break
        time.sleep(0.2)
    assert row["token_fingerprint"] != first, row
    assert row["last_error"] is None
