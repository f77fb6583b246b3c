"""The socket API: routing, the error shape, and hostile requests, without sockets.

Requests go through the real HTTP layer (`serve_http`) over trio memory streams to the real
`AgentAPI` and `Agent`; only IMS is a fake.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from fakes import FakeIMS, FixedRandom, LinkedClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keys import CLIENT_SECRET, key_pair, service_json

from aemagent.core.agent import Agent
from aemagent.credentials import parse_credential
from aemagent.daemon.api import AgentAPI, route
from aemagent.daemon.httpserver import Request, Response, serve_http


def test_route_table():
    assert route("GET", "/v1/health") == ("health", None)
    assert route("GET", "/v1/token") == ("token", None)
    assert route("POST", "/v1/profiles") == ("profiles", None)
    assert route("DELETE", "/v1/profiles/p1-e2") == ("profile", "p1-e2")
    assert route("POST", "/v1/profiles/p1-e2/refresh") == ("refresh", "p1-e2")
    assert route("POST", "/v1/shutdown") == ("shutdown", None)
    assert route("POST", "/v1/reload") == ("reload", None)


@pytest.mark.parametrize(
    "path", ["/", "/v1", "/v1/", "/v2/health", "/v1/health/x", "/v1/profiles//refresh", "/v1/x"]
)
def test_route_unknown_paths_are_404(path):
    answer = route("GET", path)
    assert isinstance(answer, Response)
    assert answer.status == 404
    assert json.loads(answer.body)["error"] == "not_found"


def test_route_wrong_method_is_405_with_allow():
    answer = route("DELETE", "/v1/token")
    assert isinstance(answer, Response)
    assert answer.status == 405
    assert ("Allow", "GET") in answer.headers


@dataclass(frozen=True)
class RawBody:
    """A request body sent as these bytes, not as JSON made of a Python value."""

    data: bytes


class Harness:
    def __init__(self, agent: Agent, api: AgentAPI) -> None:
        self.agent = agent
        self.api = api
        self.stopped = False

    async def raw(self, data: bytes) -> bytes:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_http, server, self.api)
            await client.send_all(data)
            chunks = []
            while chunk := await client.receive_some(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    async def call(self, method: str, target: str, body=None, headers=()) -> tuple[int, object]:
        if isinstance(body, RawBody):
            payload = body.data
        else:
            payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {target} HTTP/1.1\r\nHost: aemagent\r\nConnection: close\r\n"
        for name, value in headers:
            head += f"{name}: {value}\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n"
        answer = await self.raw(head.encode() + payload)
        status_line, _, rest = answer.partition(b"\r\n")
        _, _, body_bytes = rest.partition(b"\r\n\r\n")
        status = int(status_line.split()[1])
        try:
            return status, json.loads(body_bytes)
        except json.JSONDecodeError:
            return status, body_bytes


@asynccontextmanager
async def harness():
    clock = LinkedClock()
    ims = FakeIMS(clock)
    async with trio.open_nursery() as nursery:
        agent = Agent(ims, clock=clock, rng=FixedRandom(0.0))
        await nursery.start(agent.run)
        h = Harness(agent, None)  # type: ignore[arg-type]
        h.api = AgentAPI(agent, shutdown=lambda: setattr(h, "stopped", True))
        yield h
        nursery.cancel_scope.cancel()


async def test_health():
    async with harness() as h:
        status, body = await h.call("GET", "/v1/health")
        assert status == 200
        assert body["status"] == "ok"
        assert isinstance(body["pid"], int)


async def test_add_token_list_forget(autojump_clock):
    async with harness() as h:
        status, profile = await h.call("POST", "/v1/profiles", {"credential": service_json()})
        assert status == 201
        assert profile["name"] == "p123-e1234"
        assert profile["kind"] == "service"

        status, token = await h.call("GET", "/v1/token?profile=p123-e1234")
        assert status == 200
        assert token["access_token"] == "token-cm-p123-e1234-1"
        assert token["token_type"] == "Bearer"
        assert token["profile"] == "p123-e1234"
        assert token["client_id"] == "cm-p123-e1234"
        assert token["org_id"] == "1234ABCD@AdobeOrg"
        assert isinstance(token["expires_at"], int)
        assert token["expires_in"] == 86399

        status, plain = await h.call("GET", "/v1/token", headers=[("Accept", "text/plain")])
        assert (status, plain) == (200, b"token-cm-p123-e1234-1")

        status, listing = await h.call("GET", "/v1/profiles")
        assert status == 200
        [p] = listing["profiles"]
        assert p["state"] == "valid"
        assert CLIENT_SECRET not in json.dumps(listing)
        assert "token-cm" not in json.dumps(listing)

        status, gone = await h.call("DELETE", "/v1/profiles/p123-e1234")
        assert (status, gone) == (200, {"forgotten": ["p123-e1234"]})
        status, err = await h.call("GET", "/v1/token?profile=p123-e1234")
        assert status == 404
        assert err == {
            "error": "not_found",
            "message": "no profile named p123-e1234; profiles: none loaded",
        }


async def test_bad_credential_names_the_field_not_the_value(autojump_clock):
    async with harness() as h:
        broken = service_json()
        broken["integration"]["technicalAccount"]["clientSecret"] = 12345
        status, err = await h.call("POST", "/v1/profiles", {"credential": broken})
        assert status == 400
        assert err["error"] == "bad_request"
        assert "integration.technicalAccount.clientSecret" in err["message"]
        assert "12345" not in err["message"]
        status, err = await h.call("POST", "/v1/profiles", {"credential": service_json(), "x": 1})
        assert status == 400
        assert "unknown field: x" in err["message"]


async def test_usage_errors(autojump_clock):
    async with harness() as h:
        await h.call("POST", "/v1/profiles", {"credential": service_json()})
        for target in [
            "/v1/token?min_valid=abc",
            "/v1/token?min_valid=-1",
            "/v1/token?min_valid=nan",
            "/v1/token?min_valid=90000",
            "/v1/token?bogus=1",
        ]:
            status, err = await h.call("GET", target)
            assert status == 400, target
            assert err["error"] == "bad_request"
        status, err = await h.call(
            "POST", "/v1/profiles", {"credential": service_json(), "name": "../x"}
        )
        assert status == 400
        assert "invalid profile name" in err["message"]


async def test_ambiguous_is_409_and_names_the_candidates(autojump_clock):
    async with harness() as h:
        await h.call("POST", "/v1/profiles", {"credential": service_json(), "name": "a"})
        await h.call("POST", "/v1/profiles", {"credential": service_json(key_pair(1)), "name": "b"})
        status, err = await h.call("GET", "/v1/token")
        assert status == 409
        assert err["error"] == "ambiguous"
        assert "a, b" in err["message"]


async def test_refresh_and_forget_all_and_shutdown(autojump_clock):
    async with harness() as h:
        await h.call("POST", "/v1/profiles", {"credential": service_json()})
        status, profile = await h.call("POST", "/v1/profiles/p123-e1234/refresh")
        assert status == 200
        assert profile["state"] == "valid"
        status, body = await h.call("DELETE", "/v1/profiles")
        assert body == {"forgotten": ["p123-e1234"]}
        status, body = await h.call("POST", "/v1/shutdown")
        assert status == 200
        assert h.stopped


async def test_garbage_gets_a_clean_400(autojump_clock):
    async with harness() as h:
        answer = await h.raw(b"\x00\xff garbage\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        answer = await h.raw(
            b"POST /v1/profiles HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n{{{"
        )
        assert answer.startswith(b"HTTP/1.1 400 ")


_methods = st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"])
_paths = st.one_of(
    st.sampled_from(
        ["/v1/health", "/v1/token", "/v1/profiles", "/v1/profiles/x", "/v1/profiles/x/refresh"]
    ),
    st.text(alphabet=st.characters(codec="ascii", exclude_characters="\r\n #?"), max_size=40).map(
        lambda s: "/" + s
    ),
)
_queries = st.dictionaries(
    st.sampled_from(["profile", "url", "min_valid", "x"]), st.text(max_size=20), max_size=3
)
_bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(["name", "credential", "hosts", "default", "lifetime", "zz"]),
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.text(max_size=20),
            st.lists(st.text(max_size=5), max_size=3),
        ),
        max_size=4,
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=_methods, path=_paths, query=_queries, body=_bodies)
def test_any_request_gets_a_json_answer_never_a_crash(method, path, query, body):
    """h11's fuzz invariant, for the router: anything gets a well-formed answer, 500 never."""
    from urllib.parse import quote

    async def main():
        async with harness() as h:
            target = path + (
                "?" + "&".join(f"{k}={quote(v)}" for k, v in query.items()) if query else ""
            )
            payload = (
                body
                if isinstance(body, bytes)
                else (b"" if body is None else json.dumps(body).encode())
            )
            head = f"{method} {quote(target, safe='/?&=%')} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
            answer = await h.raw(
                head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
            )
            status = int(answer.split(b" ", 2)[1])
            assert status in {200, 201, 400, 404, 405, 409, 413, 503}, answer[:200]
            if status >= 400:
                _, _, raw = answer.partition(b"\r\n\r\n")
                err = json.loads(raw)
                assert set(err) == {"error", "message"}
                assert "\n" not in err["message"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_request_object_direct():
    """Handlers need no HTTP at all: a `Request` in, a `Response` out."""
    async with harness() as h:
        response = await h.api(Request("GET", "/v1/health", "/v1/health"))
        assert response.status == 200


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/profiles"), ("POST", "/v1/profiles/x/refresh"), ("POST", "/v1/reload")],
)
async def test_deeply_nested_json_is_a_400_not_a_crash(autojump_clock, method, path, depth):
    """Broken: json.loads raised RecursionError, answered 500 with a traceback in the log."""
    async with harness() as h:
        await h.agent.add(parse_credential(service_json()), name="x")
        for nested in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
            status, body = await h.call(method, path, RawBody(nested.encode()))
            if path == "/v1/reload":  # no body read: this harness has no config file
                assert status == 400
                continue
            assert status == 400, body
            assert body == {"error": "bad_request", "message": "request body is nested too deeply"}


async def test_the_emulator_answers_deeply_nested_json_with_a_400():
    from aemagent.emulator.ims import Emulator

    emulator = Emulator("http://127.0.0.1:4502")
    for path in ("/_emulator/faults", "/_emulator/clock"):
        nested = b"[" * 100_000 + b"]" * 100_000
        response = await emulator.handle(Request("POST", path, path, body=nested))
        assert response.status == 400
        assert json.loads(response.body)["error_description"] == "the body is nested too deeply"
