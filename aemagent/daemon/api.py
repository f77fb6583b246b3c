"""The socket API: routes a `Request` to the agent and maps errors to `{"error","message"}`.

Routing is a pure function (`route`) over method and path; the handlers are thin async wrappers
around `Agent`. Every answer is JSON except a token asked for with `Accept: text/plain`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from aemagent import __version__
from aemagent.core.agent import Agent
from aemagent.core.profiles import Profile, Unloaded
from aemagent.credentials import parse_credential
from aemagent.daemon.httpserver import Request, Response
from aemagent.daemon.views import describe, token_json
from aemagent.errors import AemAgentError, UsageError

if TYPE_CHECKING:
    from aemagent.daemon.sources import ConfigProfiles

log = logging.getLogger("aemagent.api")

_ADD_KEYS = frozenset({"name", "credential", "hosts", "default", "lifetime"})
# `min_valid` above a day can never be satisfied by an IMS token; the cap keeps floats sane.
_MAX_MIN_VALID = 7 * 86400

Route = tuple[str, str | None]  # (endpoint, profile name)


def route(method: str, path: str) -> Route | Response:
    """Which endpoint a request is for, or the error answer (404, 405)."""
    parts = path.split("/")
    if parts[:2] != ["", "v1"] or len(parts) < 3:
        return _not_found(path)
    rest = parts[2:]
    name: str | None = None
    if rest in (["health"], ["token"], ["shutdown"], ["profiles"], ["reload"]):
        endpoint = rest[0]
    elif len(rest) == 2 and rest[0] == "profiles" and rest[1]:
        endpoint, name = "profile", rest[1]
    elif len(rest) == 3 and rest[0] == "profiles" and rest[1] and rest[2] == "refresh":
        endpoint, name = "refresh", rest[1]
    else:
        return _not_found(path)
    allowed = _METHODS[endpoint]
    if method not in allowed:
        error = Response.error(405, "method_not_allowed", f"{method} is not allowed on {path}")
        return dataclasses.replace(error, headers=(("Allow", ", ".join(allowed)),))
    return endpoint, name


_METHODS: dict[str, tuple[str, ...]] = {
    "health": ("GET",),
    "token": ("GET",),
    "shutdown": ("POST",),
    "profiles": ("GET", "POST", "DELETE"),
    "profile": ("GET", "DELETE"),
    "refresh": ("POST",),
    "reload": ("POST",),
}


def _not_found(path: str) -> Response:
    shown = path if len(path) <= 60 else path[:60] + "…"
    return Response.error(404, "not_found", f"no such endpoint: {shown}")


class AgentAPI:
    """The request handler given to `serve_http` for the agent's socket."""

    def __init__(
        self,
        agent: Agent,
        *,
        shutdown: Callable[[], None],
        config_profiles: ConfigProfiles | None = None,
    ) -> None:
        self._agent = agent
        self._shutdown = shutdown
        self._config_profiles = config_profiles

    async def __call__(self, request: Request) -> Response:
        found = route(request.method, request.path)
        if isinstance(found, Response):
            return found
        endpoint, name = found
        handler = self._handlers[(endpoint, request.method)]
        try:
            return await handler(self, request, name)
        except AemAgentError as exc:
            return Response.error(exc.status, exc.code, str(exc))

    def _describe(self, profile: Profile) -> dict[str, Any]:
        return describe(profile, self._agent.now())

    # ---- handlers

    async def _health(self, request: Request, name: str | None) -> Response:
        del request, name
        return Response.json(200, {"status": "ok", "version": __version__, "pid": os.getpid()})

    async def _token(self, request: Request, name: str | None) -> Response:
        del name
        query = request.query
        _only_keys(query, {"profile", "url", "min_valid"}, "query parameter")
        served = await self._agent.token(
            name=query.get("profile") or None,
            url=query.get("url") or None,
            min_valid=_min_valid(query.get("min_valid")),
        )
        accept = request.header("accept") or ""
        if accept.split(";")[0].strip() == "text/plain":
            return Response(200, served.token.reveal().encode(), content_type="text/plain")
        return Response.json(200, token_json(served))

    async def _list(self, request: Request, name: str | None) -> Response:
        del request, name
        now = self._agent.now()
        return Response.json(200, {"profiles": [describe(p, now) for p in self._agent.profiles()]})

    async def _add(self, request: Request, name: str | None) -> Response:
        del name
        body = _json_body(request)
        _only_keys(body, _ADD_KEYS, "field")
        if "credential" not in body:
            raise UsageError("missing field: credential")
        credential = parse_credential(body["credential"])
        profile = await self._agent.add(
            credential,
            name=_opt_str(body, "name"),
            hosts=_hosts(body.get("hosts")),
            default=_opt_bool(body, "default"),
            lifetime=_opt_seconds(body, "lifetime"),
        )
        return Response.json(201, self._describe(profile))

    async def _forget_all(self, request: Request, name: str | None) -> Response:
        del name
        revoke = _revoke_flag(request)
        tokens = [(p, p.token) for p in self._agent.profiles()]
        dropped = self._agent.forget_all()
        answer: dict[str, Any] = {"forgotten": [p.name for p in dropped]}
        if revoke:
            answer["revoked"] = {p.name: await self._agent.revoke(p, token) for p, token in tokens}
        return Response.json(200, answer)

    async def _show(self, request: Request, name: str | None) -> Response:
        del request
        assert name is not None
        return Response.json(200, self._describe(self._agent.resolve(name)))

    async def _forget(self, request: Request, name: str | None) -> Response:
        assert name is not None
        revoke = _revoke_flag(request)
        token = self._agent.resolve(name).token
        profile = self._agent.forget(name)
        answer: dict[str, Any] = {"forgotten": [profile.name]}
        if revoke:
            answer["revoked"] = {profile.name: await self._agent.revoke(profile, token)}
        return Response.json(200, answer)

    async def _refresh(self, request: Request, name: str | None) -> Response:
        assert name is not None
        if not request.body.strip():
            before = self._agent.resolve(name)
            await self._reread_source(name)
            after = self._agent.resolve(name)
            if after is not before and _loaded_dev_token(after):
                # A development token read anew from its source: loaded, nothing to fetch.
                return Response.json(200, {**self._describe(after), "refreshed": True})
            profile = await self._agent.refresh(name)
            return Response.json(200, {**self._describe(profile), "refreshed": True})
        body = _json_body(request)
        _only_keys(body, {"if_current"}, "field")
        if_current = body.get("if_current")
        if not isinstance(if_current, str) or len(if_current) != 64:
            raise UsageError("field if_current must be the SHA-256 of a token, in hex")
        profile, refreshed = await self._agent.force_refresh(name, if_current)
        return Response.json(200, {**self._describe(profile), "refreshed": refreshed})

    async def _reread_source(self, name: str) -> None:
        """A manual refresh of a config-file profile reads its file or command again first."""
        profile = self._agent.resolve(name)
        source = self._config_profiles.source(name) if self._config_profiles else None
        if self._config_profiles is not None and source is not None and profile.source == "config":
            await self._config_profiles.reread(name)

    async def _reload(self, request: Request, name: str | None) -> Response:
        """Read the config file again and load its profiles; a bad file keeps them (400)."""
        del request, name
        if self._config_profiles is None:
            raise UsageError("this agent has no config file to reload")
        outcome = await self._config_profiles.reload()
        return Response.json(200, outcome.to_json())

    async def _shutdown_now(self, request: Request, name: str | None) -> Response:
        del request, name
        log.info("shutdown requested over the socket")
        self._shutdown()
        return Response.json(200, {"status": "shutting down", "pid": os.getpid()})

    _handlers: ClassVar[
        dict[tuple[str, str], Callable[[AgentAPI, Request, str | None], Awaitable[Response]]]
    ] = {
        ("health", "GET"): _health,
        ("token", "GET"): _token,
        ("profiles", "GET"): _list,
        ("profiles", "POST"): _add,
        ("profiles", "DELETE"): _forget_all,
        ("profile", "GET"): _show,
        ("profile", "DELETE"): _forget,
        ("refresh", "POST"): _refresh,
        ("reload", "POST"): _reload,
        ("shutdown", "POST"): _shutdown_now,
    }


def _revoke_flag(request: Request) -> bool:
    _only_keys(request.query, {"revoke"}, "query parameter")
    value = request.query.get("revoke", "0").lower()
    if value not in ("0", "1", "true", "false", ""):
        raise UsageError("revoke must be 1 or 0")
    return value in ("1", "true")


def _loaded_dev_token(profile: Profile) -> bool:
    return not profile.schedule.refreshable and not isinstance(profile.credential, Unloaded)


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"request body is not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:
        raise UsageError("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body


def _only_keys(given: Any, allowed: set[str] | frozenset[str], what: str) -> None:
    unknown = sorted(set(given) - allowed)
    if unknown:
        shown = ", ".join(k[:40] for k in unknown[:5])
        raise UsageError(f"unknown {what}: {shown} (allowed: {', '.join(sorted(allowed))})")


def _min_valid(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or value > _MAX_MIN_VALID:
        raise UsageError(f"min_valid must be a number of seconds, got {text[:20]!r}")
    return value


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"field {key} must be a string, got {type(value).__name__}")
    return value


def _opt_bool(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"field {key} must be true or false, got {type(value).__name__}")
    return value


def _opt_seconds(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise UsageError(f"field {key} must be a positive number of seconds")
    if not math.isfinite(value):
        raise UsageError(f"field {key} must be a positive number of seconds")
    return float(value)


def _hosts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise UsageError("field hosts must be a list of host patterns")
    if len(value) > 100:
        raise UsageError("field hosts: at most 100 patterns")
    return tuple(h.lower() for h in value)
