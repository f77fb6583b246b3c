"""A fake IMS for the IMS client's tests: httpx.MockTransport answers, on IMS's own clock.

Shared by tests/unit/test_ims.py and tests/integration/test_ims_hostile.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
from keys import CLIENT_SECRET, dev_token, ims_token, integration, key_pair, oauth_json

from aemagent.core.clocks import FakeClock
from aemagent.credentials import DevToken, OAuthCredential, ServiceCredential, parse_credential
from aemagent.ims import IMSClient

IMS_NOW = 1_800_000_000.0  # FakeClock's default wall time
BASE = "https://ims-na1.adobelogin.com"
Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


@functools.cache  # parsing validates the RSA key, which is slow
def credential(**kwargs: Any) -> ServiceCredential:
    cred = parse_credential(integration(**kwargs))
    assert isinstance(cred, ServiceCredential)
    return cred


def oauth(**kwargs: Any) -> OAuthCredential:
    cred = parse_credential(oauth_json(**kwargs))
    assert isinstance(cred, OAuthCredential)
    return cred


def devtoken() -> DevToken:
    cred = parse_credential(dev_token())
    assert isinstance(cred, DevToken)
    return cred


def form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)


def error_answer(
    status: int, error: str | None = None, description: str = "", **headers: str
) -> httpx.Response:
    body = {"error": error, "error_description": description} if error else None
    return httpx.Response(status, json=body, headers=headers)


class FakeIMS:
    """IMS's JWT exchange on its own clock: checks signature, audience and `exp` like IMS does.

    Scripted `answers` are given first; after them it answers for itself. Every request is kept.
    """

    def __init__(self, *, now: float = IMS_NOW, send_date: bool = True) -> None:
        self.now = now
        self.send_date = send_date
        self.requests: list[httpx.Request] = []
        self.answers: list[Answer] = []
        self.token = ims_token()
        self.on_request: Callable[[], None] = lambda: None

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.on_request()
        response = self.answer(request)
        if self.send_date:
            response.headers["Date"] = formatdate(self.now, usegmt=True)
        return response

    def answer(self, request: httpx.Request) -> httpx.Response:
        if self.answers:
            answer = self.answers.pop(0)
            return answer(request) if callable(answer) else answer
        if request.url.path == "/ims/token/v3":
            if form(request)["client_secret"] != [CLIENT_SECRET]:
                return error_answer(401, "invalid_client", "invalid client_secret")
            body = {"access_token": self.token, "token_type": "bearer", "expires_in": 86399}
            return httpx.Response(200, json=body)
        if request.url.path == "/ims/invalidate_token/v2":
            return httpx.Response(200)  # IMS answers an empty 200
        assertion = form(request)["jwt_token"][0]
        claims = jwt.decode(
            assertion,
            key_pair().public_key,
            algorithms=["RS256"],
            audience=f"{BASE}/c/cm-p123-e1234",
            options={"verify_exp": False, "verify_iat": False},
        )
        if claims["exp"] < self.now - 30:  # IMS allows 30 s of skew
            return error_answer(400, "invalid_token", "JWT expired", **{"X-Debug-Id": "dbg-1"})
        body = {"token_type": "bearer", "access_token": self.token, "expires_in": 86399999}
        return httpx.Response(200, json=body)

    def client(self, clock: FakeClock | None = None, **kwargs: Any) -> IMSClient:
        return IMSClient(
            clock=clock or FakeClock(), transport=httpx.MockTransport(self.handler), **kwargs
        )
