"""Fault injection for the IMS emulator: how the next requests to an endpoint fail.

Posted as JSON to `/_emulator/faults` (see `aemagent.emulator`). A fault first sleeps `delay`
seconds, then: `drop` closes the connection without an answer; `malformed` answers 200 with an
HTML body; `status` (503 if only `body` or `error` is given) answers with `body` verbatim or an
IMS-shaped error, plus `Retry-After` when `retry_after` is given and `Location` when `location`
is (a 307 with a `location` is a redirect, to prove the client does not follow it);
`raw_body_b64` answers `status` (200 if not given) with exactly those bytes, base64 in the JSON
(a gzip bomb with `Content-Encoding: gzip, gzip`, bytes no JSON string can carry); `headers`
(an object of strings, not the framing ones) go into any of these answers, `Content-Type` too;
with none of these the request is answered normally after the delay. `Fault.parse` is strict,
because a test hook that silently ignored a misspelt key would make a test pass for the wrong
reason.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass

import trio

from aemagent.daemon.httpserver import DropConnection, Response
from aemagent.emulator.tokens import Refusal

ENDPOINTS = frozenset({"jwt", "token", "invalidate", "aem", "any"})
# The emulator's server frames every answer itself.
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class Fault:
    """How the next requests to an endpoint fail."""

    status: int | None = None
    body: str | None = None
    error: str | None = None
    error_description: str | None = None
    retry_after: str | None = None
    location: str | None = None
    delay: float = 0.0
    drop: bool = False
    malformed: bool = False
    raw_body: bytes | None = None  # `raw_body_b64` in the hook's JSON
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, obj: object) -> tuple[str, int, Fault]:
        """(endpoint, count, fault) from the hook's JSON; raises Refusal(400)."""
        if not isinstance(obj, dict):
            raise _hook_error("the fault must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)} - {"raw_body"}
        known |= {"endpoint", "count", "raw_body_b64"}
        if unknown := sorted(set(obj) - known):
            raise _hook_error(f"unknown fault keys: {', '.join(unknown)}")
        endpoint, count = obj.get("endpoint", "any"), obj.get("count", 1)
        if endpoint not in ENDPOINTS:
            raise _hook_error(f"endpoint must be one of {', '.join(sorted(ENDPOINTS))}")
        if type(count) is not int or count < 1:
            raise _hook_error("count must be a positive integer")
        status = obj.get("status")
        if status is not None and (type(status) is not int or not 200 <= status <= 599):
            raise _hook_error("status must be an integer from 200 to 599")
        for key in ("body", "error", "error_description", "location"):
            if not isinstance(obj.get(key, ""), str):
                raise _hook_error(f"{key} must be a string")
        retry_after = obj.get("retry_after")
        if retry_after is not None and type(retry_after) not in (int, str):
            raise _hook_error("retry_after must be a string or an integer")
        delay = obj.get("delay", 0)
        if type(delay) not in (int, float) or not 0 <= delay <= 600:
            raise _hook_error("delay must be a number of seconds from 0 to 600")
        if not all(isinstance(obj.get(key, False), bool) for key in ("drop", "malformed")):
            raise _hook_error("drop and malformed must be booleans")
        raw_body = None
        if "raw_body_b64" in obj:
            try:
                raw_body = base64.b64decode(obj["raw_body_b64"], validate=True)
            except (TypeError, ValueError, binascii.Error):
                raise _hook_error("raw_body_b64 must be a base64 string") from None
        headers = obj.get("headers", {})
        if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
        ):
            raise _hook_error("headers must be an object of strings")
        if framing := sorted(set(map(str.lower, headers)) & _FRAMING):
            raise _hook_error(f"headers must not set {', '.join(framing)}")
        fault = cls(
            status=status,
            body=obj.get("body"),
            error=obj.get("error"),
            error_description=obj.get("error_description"),
            retry_after=None if retry_after is None else str(retry_after),
            location=obj.get("location"),
            delay=float(delay),
            drop=obj.get("drop", False),
            malformed=obj.get("malformed", False),
            raw_body=raw_body,
            headers=tuple(headers.items()),
        )
        return endpoint, count, fault

    async def apply(self) -> Response | None:
        """The faulty answer; None to answer normally (after the delay)."""
        await trio.sleep(self.delay)
        if self.drop:
            raise DropConnection
        if self.malformed:
            return Response(200, b"<html><body>502 Bad Gateway</body></html>\n", "text/html")
        content_type = "application/json"
        headers: tuple[tuple[str, str], ...] = ()
        for name, value in self.headers:
            if name.lower() == "content-type":
                content_type = value
            else:
                headers += ((name, value),)
        if self.raw_body is not None:
            return Response(self.status or 200, self.raw_body, content_type, headers)
        if self.status is None and self.body is None and self.error is None:
            return None
        status = self.status or 503
        if self.retry_after is not None:
            headers += (("Retry-After", self.retry_after),)
        if self.location is not None:
            headers += (("Location", self.location),)
        if self.body is not None:
            return Response(status, self.body.encode(), content_type, headers)
        error = self.error or ("server_error" if status >= 500 else "fault")
        description = self.error_description or "fault injected by the emulator"
        answer = Response.json(status, {"error": error, "error_description": description}, headers)
        return dataclasses.replace(answer, content_type=content_type)


def _hook_error(description: str) -> Refusal:
    return Refusal(400, "bad_request", description)
