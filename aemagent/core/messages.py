"""What the agent says: why a caller gets no token, and the log lines of a profile's tokens.

Pure functions of a profile's state (and the clocks' reading), kept apart from the agent's task
logic so that each reads on its own: the agent decides, these words explain.
"""

from __future__ import annotations

import logging

import trio

from aemagent.core.clocks import Now
from aemagent.core.logs import describe_duration, fingerprint, utc_iso
from aemagent.core.policy import TokenTimes
from aemagent.core.profiles import Profile, Unloaded
from aemagent.credentials import DevToken
from aemagent.errors import AemAgentError, IMSError, IMSTransientError, UnavailableError, UsageError

log = logging.getLogger("aemagent.agent")


def dev_token_advice(profile: Profile, *, replace: bool) -> str:
    """What to do about a development token that is too short-lived, expired, or unrefreshable."""
    download = "download a new one from the AEM Developer Console"
    if profile.source == "config":
        return f"{download}, update its source, then `aemagent reload`"
    return f"{download} and add it again" if replace else download


def expired_dev_token(token: DevToken) -> UnavailableError:
    return UnavailableError(
        f"the development token expired at {utc_iso(token.expires_at)};"
        " download a new one from the AEM Developer Console"
    )


def no_answer(profile: Profile, wait: float) -> UnavailableError:
    """A request for a token that waited `wait` s for IMS in vain."""
    return UnavailableError(
        f"profile {profile.name}: IMS did not answer within {wait:g} s"
        + (f"; last error: {profile.last_error}" if profile.last_error else "")
    )


def raise_unless_fetch_can_help(profile: Profile, now: Now, need: float, fetched: bool) -> None:
    """Raise UnavailableError if fetching a token cannot give the caller one valid `need` s.

    `fetched`: a token was fetched for this profile since the caller started waiting (so a
    fetch just gave a token too short-lived). A backoff is waited out only if it ends before
    the caller's deadline (trio's current effective deadline).
    """
    schedule = profile.schedule
    what = f"profile {profile.name}"
    if isinstance(profile.credential, Unloaded):
        raise UnavailableError(
            f"{what}: {profile.credential.error};"
            f" run `aemagent refresh {profile.name}` to read it again"
        )
    if not schedule.refreshable:
        times = schedule.token
        if times is not None and times.remaining(now) > 0:
            raise UnavailableError(
                f"{what}: the development token has only"
                f" {describe_duration(times.remaining(now))} left, less than {need:g} s;"
                f" {dev_token_advice(profile, replace=False)}"
            )
        expired = f" at {utc_iso(times.wall_expiry)}" if times else ""
        raise UnavailableError(
            f"{what}: the development token expired{expired};"
            f" {dev_token_advice(profile, replace=False)}"
        )
    if schedule.blocked:
        raise UnavailableError(
            f"{what}: {profile.last_error}; fix the credential, then run"
            f" `aemagent refresh {profile.name}` or add it again"
        )
    if fetched and schedule.token is not None:
        raise UnavailableError(
            f"{what}: a fresh token is valid for only"
            f" {schedule.token.remaining(now):.0f} s, less than the {need:g} s asked for"
        )
    if schedule.backing_off(now):
        assert schedule.retry_at is not None
        retry_in = schedule.retry_at - now.boot
        if trio.current_time() + retry_in > trio.current_effective_deadline():
            raise UnavailableError(
                f"{what}: {profile.last_error}; next attempt in {describe_duration(retry_in)}"
            )


def refresh_refused(profile: Profile) -> AemAgentError | None:
    """Why a manual refresh of `profile` cannot fetch, or None if it can."""
    if isinstance(profile.credential, Unloaded):
        return UnavailableError(f"profile {profile.name}: {profile.credential.error}")
    if not profile.schedule.refreshable:
        return UsageError(
            f"profile {profile.name}: a development token cannot be refreshed;"
            f" {dev_token_advice(profile, replace=True)}"
        )
    return None


def retrying(profile: Profile, exc: IMSTransientError, now: Now, *, current: bool) -> str:
    """What a manual refresh that failed transiently tells the user: the background retry.

    `current`: the profile still holds its name (else nothing retries it)."""
    text = f"profile {profile.name}: {exc}"
    if not current:
        return text
    times = profile.schedule.token
    retry_at = profile.schedule.retry_at
    if profile.token is not None and times is not None and times.remaining(now) > 0:
        left = describe_duration(times.remaining(now))
        return (
            f"{text}; the current token stays valid for {left}"
            " and the agent retries in the background"
        )
    when = f" (next attempt in {describe_duration(retry_at - now.boot)})" if retry_at else ""
    return f"{text}; there is no valid token and the agent retries in the background{when}"


def log_new_token(profile: Profile, times: TokenTimes, now: Now) -> None:
    assert profile.token is not None
    log.info(
        "profile %s: new token %s, expires %s (in %s), refresh in %s",
        profile.name,
        fingerprint(profile.token.reveal()),
        utc_iso(times.wall_expiry),
        describe_duration(times.remaining(now)),
        describe_duration(times.remaining(now) - times.refresh_margin),
    )


def log_failure(profile: Profile, exc: IMSError, now: Now) -> None:
    """After the schedule took the failure: when the agent tries again, if it does."""
    if exc.transient:
        retry_at = profile.schedule.retry_at or now.boot
        log.warning(
            "profile %s: %s; retrying in %s",
            profile.name,
            exc,
            describe_duration(retry_at - now.boot),
        )
    else:
        log.error(
            "profile %s: %s; no automatic retries until `aemagent refresh %s`",
            profile.name,
            exc,
            profile.name,
        )
