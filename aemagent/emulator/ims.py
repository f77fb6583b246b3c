"""The IMS emulator's state and endpoints: a `serve_http` handler with no sockets of its own.

`Emulator.handle` answers IMS's three endpoints (JWT exchange, client credentials, token
invalidation), the AEM stand-in and the `/_emulator/` test hooks; the endpoints are listed in
`aemagent.emulator.app`. Refusals follow IMS's error shape `{"error", "error_description"}`.
Checks run in a fixed order (form, client, secret, then the JWT rules of
`tokens.check_jwt_assertion`), so a request with several faults always gets the same answer.

The two token endpoints (`/ims/exchange/jwt`, `/ims/token/v3`) are counted while they are being
answered: `in_flight` now, `max_in_flight` ever (the high-water mark the agent's IMS concurrency
cap must keep under), `exchanges` in all. `exchange_delay` holds every such request that long
before it is answered, as real IMS takes a noticeable while: without it, answers are immediate
and no concurrency could ever be seen.
"""

from __future__ import annotations

import collections
import dataclasses
import email.utils
import hmac
import json
import logging
import math
import re
import time
import urllib.parse
import uuid
from typing import Any

import trio

from aemagent.daemon.httpserver import DropConnection, Request, Response
from aemagent.emulator.faults import Fault
from aemagent.emulator.tokens import (
    DEVTOKEN_CLIENT_ID,
    InvalidAccessToken,
    OAuthClient,
    Refusal,
    ServiceIntegration,
    TokenIssuer,
    check_jwt_assertion,
    peek_jwt,
)

logger = logging.getLogger("aemagent.emulator")

DEFAULT_TOKEN_LIFETIME = 24 * 3600  # IMS's
_FORM = "application/x-www-form-urlencoded"
_LOG_SIZE = 1000  # requests remembered: enough for any test, bounded for a long demo
# Form field names are short snake_case words; anything else might be a misplaced secret.
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ENDPOINTS = {
    "/ims/exchange/jwt": "jwt",
    "/ims/token/v3": "token",
    "/ims/invalidate_token/v2": "invalidate",
}
_TOKEN_ENDPOINTS = frozenset({"jwt", "token"})


@dataclasses.dataclass
class ExchangeStats:
    """Requests to the token endpoints: being answered now, the most at once, and in all."""

    in_flight: int = 0
    max_in_flight: int = 0
    exchanges: int = 0

    def started(self) -> None:
        self.in_flight += 1
        self.exchanges += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def finished(self) -> None:
        self.in_flight -= 1

    def reset(self) -> None:
        """Start counting afresh; requests still being answered count as the high-water mark."""
        self.max_in_flight = self.in_flight
        self.exchanges = 0


class Emulator:
    """The emulator's state: registered clients, issued tokens, faults, the request log."""

    def __init__(
        self,
        base_url: str,
        *,
        token_lifetime: int = DEFAULT_TOKEN_LIFETIME,
        clock_offset: float = 0.0,
        exchange_delay: float = 0.0,
    ) -> None:
        self.base_url = base_url
        self.token_lifetime = token_lifetime
        self.clock_offset = clock_offset
        self.exchange_delay = exchange_delay  # seconds every token request is held
        self.stats = ExchangeStats()
        self.service = ServiceIntegration.generate(self.now())
        self.oauth = OAuthClient.generate()
        self.issuer = TokenIssuer.generate()
        self.faults: dict[str, collections.deque[Fault]] = collections.defaultdict(
            collections.deque
        )
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=_LOG_SIZE)
        self.devtoken = self.issuer.mint(
            client_id=DEVTOKEN_CLIENT_ID,
            user_id="EMULATOR00000000000000CC@AdobeID",
            scope="AdobeID,openid,read_organizations,additional_info.projectedProductContext",
            now=self.now(),
            lifetime=token_lifetime,
        )

    def now(self) -> float:
        return time.time() + self.clock_offset

    def credential_documents(self) -> dict[str, dict[str, Any]]:
        """What `--write-credentials` writes, by file stem."""
        return {
            "service": self.service.document(self.base_url),
            "oauth": self.oauth.document(self.base_url),
            "devtoken": {"ok": True, "statusCode": 200, "accessToken": self.devtoken},
        }

    def add_fault(self, endpoint: str, fault: Fault, count: int = 1) -> None:
        self.faults[endpoint].extend([fault] * count)

    def _take_fault(self, endpoint: str) -> Fault | None:
        for queue in (self.faults[endpoint], self.faults["any"]):
            if queue:
                return queue.popleft()
        return None

    async def handle(self, request: Request) -> Response:
        """The `serve_http` handler."""
        debug_id = uuid.uuid4().hex
        if request.path.startswith("/_emulator/"):
            response = self._hook(request)
        else:
            try:
                response = await self._serve(request, debug_id)
            except DropConnection:
                logger.info(
                    "%s %s -> dropped X-Debug-Id %s", request.method, request.path, debug_id
                )
                raise
        logger.info(
            "%s %s -> %d X-Debug-Id %s", request.method, request.path, response.status, debug_id
        )
        date = email.utils.formatdate(self.now(), usegmt=True)
        return dataclasses.replace(
            response, headers=(*response.headers, ("X-Debug-Id", debug_id), ("Date", date))
        )

    async def _serve(self, request: Request, debug_id: str) -> Response:
        endpoint = _ENDPOINTS.get(request.path)
        if endpoint is None and request.path.startswith("/aem/"):
            endpoint = "aem"
        if endpoint is None:
            return _ims_error(404, "not_found", f"no such endpoint: {request.path}")
        counted = endpoint in _TOKEN_ENDPOINTS
        if counted:
            self.stats.started()
        try:
            return await self._answer(request, endpoint, debug_id, counted)
        finally:
            if counted:
                self.stats.finished()

    async def _answer(
        self, request: Request, endpoint: str, debug_id: str, counted: bool
    ) -> Response:
        record = self._record(request, endpoint, debug_id)  # the time it arrived
        if counted and self.exchange_delay > 0:
            await trio.sleep(self.exchange_delay)
        fault = self._take_fault(endpoint)
        if fault is not None:
            record["fault"] = True
            response = await fault.apply()  # DropConnection leaves the status None
            if response is not None:
                record["status"] = response.status
                return response
        try:
            response = self._route(endpoint, request)
        except Refusal as refusal:
            response = _ims_error(refusal.status, refusal.error, refusal.description)
        record["status"] = response.status
        return response

    def _record(self, request: Request, endpoint: str, debug_id: str) -> dict[str, Any]:
        """Log what was asked, never a value that could be a secret or a token."""
        form = _form_fields(request)
        jwt_token = form.get("jwt_token") if form is not None else None
        record = {
            "time": self.now(),
            "method": request.method,
            "path": request.path,
            "endpoint": endpoint,
            "content_type": request.header("content-type"),
            "fields": None if form is None else sorted(_shown_name(name) for name in form),
            "jwt": None if jwt_token is None else peek_jwt(jwt_token),
            "debug_id": debug_id,
            "fault": False,
            "status": None,
        }
        self.requests.append(record)
        return record

    def _route(self, endpoint: str, request: Request) -> Response:
        method = "GET" if endpoint == "aem" else "POST"
        if request.method != method:
            return dataclasses.replace(
                _ims_error(405, "method_not_allowed", f"use {method}"), headers=(("Allow", method),)
            )
        if endpoint == "jwt":
            return self._exchange_jwt(request)
        if endpoint == "token":
            return self._client_credentials(request)
        if endpoint == "invalidate":
            return self._invalidate(request)
        return self._aem(request)

    def _exchange_jwt(self, request: Request) -> Response:
        form = _form(request, required={"client_id", "client_secret", "jwt_token"})
        service = self.service
        if form["client_id"] != service.client_id:
            raise Refusal(400, "invalid_client", "unknown client_id")
        _check_secret(form["client_secret"], service.client_secret)
        scopes = check_jwt_assertion(form["jwt_token"], service, self.base_url, self.now())
        token = self._mint(service.client_id, service.technical_account_id, ",".join(scopes))
        lifetime_ms = self.token_lifetime * 1000  # IMS's JWT exchange: expires_in in milliseconds
        return Response.json(
            200, {"token_type": "bearer", "access_token": token, "expires_in": lifetime_ms}
        )

    def _client_credentials(self, request: Request) -> Response:
        form = _form(request, required={"grant_type", "client_id", "client_secret", "scope"})
        oauth = self.oauth
        if form["grant_type"] != "client_credentials":
            raise Refusal(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if form["client_id"] != oauth.client_id:
            raise Refusal(400, "invalid_client", "unknown client_id")
        _check_secret(form["client_secret"], oauth.client_secret)
        asked = [s.strip() for s in form["scope"].split(",") if s.strip()]
        if not asked or not set(asked) <= set(oauth.scopes):
            raise Refusal(
                400, "invalid_scope", "the requested scopes are not a subset of the client's"
            )
        token = self._mint(oauth.client_id, oauth.technical_account_id, ",".join(asked))
        # IMS's client-credentials endpoint gives expires_in in seconds.
        return Response.json(
            200, {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime}
        )

    def _invalidate(self, request: Request) -> Response:
        form = _form(
            request,
            required={"token_type", "token", "client_id", "client_secret"},
            optional={"cascading"},
        )
        if form["token_type"] != "access_token":  # noqa: S105 - a type name, not a token
            raise Refusal(400, "unsupported_token_type", "token_type must be access_token")
        clients = {c.client_id: c.client_secret for c in (self.service, self.oauth)}
        if form["client_id"] not in clients:
            raise Refusal(400, "invalid_client", "unknown client_id")
        _check_secret(form["client_secret"], clients[form["client_id"]])
        try:
            claims = self.issuer.verify(form["token"], now=self.now(), check_expiry=False)
        except InvalidAccessToken as exc:
            raise Refusal(400, "invalid_token", str(exc)) from None
        if claims["client_id"] != form["client_id"]:
            raise Refusal(400, "invalid_token", "the token was not issued to this client")
        self.issuer.revoked.add(str(claims["id"]))
        return Response(200)  # IMS answers an empty 200

    def _aem(self, request: Request) -> Response:
        try:
            claims = self.issuer.verify(_bearer(request), now=self.now())
        except InvalidAccessToken as exc:
            error = {"error": "invalid_token", "error_description": str(exc)}
            return Response.json(
                401, error, (("WWW-Authenticate", 'Bearer error="invalid_token"'),)
            )
        body = {
            "ok": True,
            "path": request.path,
            "client_id": claims["client_id"],
            "user_id": claims["user_id"],
        }
        return Response.json(200, body)

    def _mint(self, client_id: str, user_id: str, scope: str) -> str:
        return self.issuer.mint(
            client_id=client_id,
            user_id=user_id,
            scope=scope,
            now=self.now(),
            lifetime=self.token_lifetime,
        )

    def _hook(self, request: Request) -> Response:
        route = (request.method, request.path)
        try:
            if route == ("POST", "/_emulator/faults"):
                endpoint, count, fault = Fault.parse(_json_body(request))
                self.add_fault(endpoint, fault, count)
            elif route == ("DELETE", "/_emulator/faults"):
                self.faults.clear()
            elif route == ("GET", "/_emulator/requests"):
                return Response.json(200, list(self.requests))
            elif route == ("DELETE", "/_emulator/requests"):
                self.requests.clear()
            elif route[1] == "/_emulator/stats" and route[0] in ("GET", "DELETE"):
                if route[0] == "DELETE":
                    self.stats.reset()
                return Response.json(200, dataclasses.asdict(self.stats))
            elif route == ("POST", "/_emulator/clock"):
                self.clock_offset = _offset(_json_body(request))
            elif route != ("GET", "/_emulator/clock"):
                return _ims_error(
                    404, "not_found", f"no such test hook: {request.method} {request.path}"
                )
        except Refusal as refusal:
            return _ims_error(refusal.status, refusal.error, refusal.description)
        pending = {endpoint: len(queue) for endpoint, queue in self.faults.items() if queue}
        return Response.json(
            200, {"offset": self.clock_offset, "now": self.now(), "faults": pending}
        )


def _ims_error(status: int, error: str, description: str) -> Response:
    return Response.json(status, {"error": error, "error_description": description})


def _bearer(request: Request) -> str:
    scheme, _, token = (request.header("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise InvalidAccessToken("a bearer token is required")
    return token.strip()


def _check_secret(given: str, expected: str) -> None:
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Refusal(401, "invalid_client", "invalid client_id and client_secret combination")


def _form(
    request: Request, *, required: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> dict[str, str]:
    """The urlencoded body with exactly the `required` fields (plus `optional` ones)."""
    if _content_type(request) != _FORM:
        raise Refusal(400, "bad_request", f"Content-Type must be {_FORM}")
    try:
        pairs = urllib.parse.parse_qsl(
            request.body.decode(), keep_blank_values=True, strict_parsing=True
        )
    except (UnicodeDecodeError, ValueError):
        raise Refusal(400, "bad_request", "the form body could not be parsed") from None
    form = dict(pairs)
    if len(form) != len(pairs):
        raise Refusal(400, "bad_request", "a form field is repeated")
    if missing := sorted(required - set(form)):
        raise Refusal(400, "bad_request", f"missing form fields: {', '.join(missing)}")
    if extra := sorted(set(form) - required - optional):
        raise Refusal(400, "bad_request", f"unexpected form fields: {', '.join(extra)}")
    return form


def _content_type(request: Request) -> str:
    return (request.header("content-type") or "").partition(";")[0].strip().lower()


def _form_fields(request: Request) -> dict[str, str] | None:
    """The form fields, leniently parsed, for the log; None for a body that is not a form."""
    if _content_type(request) != _FORM:
        return None
    body = request.body.decode("utf-8", "replace")
    return dict(urllib.parse.parse_qsl(body, keep_blank_values=True))


def _shown_name(name: str) -> str:
    return name if _FIELD_NAME.fullmatch(name) else f"<{len(name)} chars>"


def _json_body(request: Request) -> object:
    try:
        return json.loads(request.body)
    except ValueError:
        raise Refusal(400, "bad_request", "the body must be JSON") from None
    except RecursionError:
        raise Refusal(400, "bad_request", "the body is nested too deeply") from None


def _offset(obj: object) -> float:
    offset = obj.get("offset") if isinstance(obj, dict) else None
    if isinstance(offset, bool) or not isinstance(offset, int | float) or not math.isfinite(offset):
        raise Refusal(400, "bad_request", 'the body must be {"offset": seconds}')
    return float(offset)
