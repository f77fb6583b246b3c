"""The emulator's exchange counters (`/_emulator/stats`) and `--exchange-delay`, over loopback."""

from __future__ import annotations

import argparse
import json
import ssl
import time
from typing import Any, cast

import httpx
import pytest
import trio

from aemagent.emulator.app import EmulatorSettings, RunningEmulator, add_arguments, serve_emulator

DELAY = 0.3  # long enough for every concurrent request to arrive before the first is answered
SSL_CONTEXT = ssl.create_default_context()


@pytest.fixture
async def client():
    async with httpx.AsyncClient(trust_env=False, timeout=10, verify=SSL_CONTEXT) as client:
        yield client


async def start(nursery: trio.Nursery, tmp_path, delay: float) -> RunningEmulator:
    settings = EmulatorSettings(write_credentials=tmp_path / "creds", exchange_delay=delay)
    emu: RunningEmulator = await nursery.start(serve_emulator, settings)
    return emu


async def client_credentials(client: httpx.AsyncClient, emu: RunningEmulator) -> httpx.Response:
    creds = json.loads(emu.credentials["oauth"].read_text())
    form = {
        "grant_type": "client_credentials",
        "client_id": creds["client_id"],
        "client_secret": creds["client_secret"],
        "scope": ",".join(creds["scopes"]),
    }
    return await client.post(f"{emu.url}/ims/token/v3", data=form)


async def stats(
    client: httpx.AsyncClient, emu: RunningEmulator, method: str = "GET"
) -> dict[str, Any]:
    response = await client.request(method, f"{emu.url}/_emulator/stats")
    assert response.status_code == 200, response.text
    return cast("dict[str, Any]", response.json())


async def test_stats_count_concurrent_exchanges_and_the_delay_holds_them(nursery, tmp_path, client):
    emu = await start(nursery, tmp_path, DELAY)
    assert await stats(client, emu) == {"in_flight": 0, "max_in_flight": 0, "exchanges": 0}
    answers: list[httpx.Response] = []
    seen_in_flight: list[int] = []

    async def one() -> None:
        answers.append(await client_credentials(client, emu))

    async def peek() -> None:
        # Until every request has arrived, or one is answered (then fewer than 5 are seen).
        while (in_flight := (await stats(client, emu))["in_flight"]) < 5 and not answers:
            await trio.sleep(0.01)
        seen_in_flight.append(in_flight)

    t0 = time.monotonic()
    async with trio.open_nursery() as requests:
        for _ in range(5):
            requests.start_soon(one)
        requests.start_soon(peek)
    elapsed = time.monotonic() - t0
    assert [a.status_code for a in answers] == [200] * 5
    assert elapsed >= DELAY  # held, not answered at once
    assert seen_in_flight == [5]
    assert await stats(client, emu) == {"in_flight": 0, "max_in_flight": 5, "exchanges": 5}

    # A refused JWT exchange is a token request too; the AEM stand-in and the hooks are not.
    t0 = time.monotonic()
    refused = await client.post(f"{emu.url}/ims/exchange/jwt", data={"client_id": "x"})
    assert refused.status_code == 400
    assert time.monotonic() - t0 >= DELAY
    t0 = time.monotonic()
    assert (await client.get(f"{emu.url}/aem/x")).status_code == 401
    assert time.monotonic() - t0 < DELAY
    assert await stats(client, emu) == {"in_flight": 0, "max_in_flight": 5, "exchanges": 6}

    # DELETE answers the counts it started from, then counts afresh.
    assert await stats(client, emu, "DELETE") == {
        "in_flight": 0,
        "max_in_flight": 0,
        "exchanges": 0,
    }
    assert (await client_credentials(client, emu)).status_code == 200
    assert await stats(client, emu) == {"in_flight": 0, "max_in_flight": 1, "exchanges": 1}
    # The request log is separate and untouched by the stats hook.
    seen = (await client.get(f"{emu.url}/_emulator/requests")).json()
    assert [r["endpoint"] for r in seen] == ["token"] * 5 + ["jwt", "aem", "token"]


async def test_no_delay_by_default_and_a_reset_keeps_requests_in_flight(nursery, tmp_path, client):
    emu = await start(nursery, tmp_path, 0.0)
    t0 = time.monotonic()
    assert (await client_credentials(client, emu)).status_code == 200
    assert time.monotonic() - t0 < 2  # generous: catches a hang, not a slow machine
    # A request held by a fault's delay is in flight; a reset meanwhile keeps it as the maximum.
    fault = {"endpoint": "token", "delay": DELAY}
    assert (await client.post(f"{emu.url}/_emulator/faults", json=fault)).status_code == 200
    async with trio.open_nursery() as requests:
        requests.start_soon(client_credentials, client, emu)
        with trio.fail_after(DELAY):  # the request arrives, and is held, well within its delay
            while (await stats(client, emu))["in_flight"] == 0:
                await trio.sleep(0.01)
        assert await stats(client, emu, "DELETE") == {
            "in_flight": 1,
            "max_in_flight": 1,
            "exchanges": 0,
        }
    assert await stats(client, emu) == {"in_flight": 0, "max_in_flight": 1, "exchanges": 0}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="aemagent emulator")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_exchange_delay_argument():
    assert parse([]).exchange_delay == 0.0
    assert parse(["--exchange-delay", "0.05"]).exchange_delay == 0.05
    for bad in ("-1", "nan", "inf", "601", "soon"):
        with pytest.raises(SystemExit):
            parse(["--exchange-delay", bad])
