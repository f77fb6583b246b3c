"""The agent's token lifecycle on trio's MockClock: days of timers in no real time.

The fake IMS and fake credentials are hand-written (tests/support/fakes.py); the wall and boot clocks follow
trio's virtual clock, and tests move them further to simulate suspend and clock jumps.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
from fakes import DAY, FakeCredential, FakeIMS, FixedRandom, LinkedClock

from aemagent.core.agent import Agent
from aemagent.daemon.views import describe
from aemagent.errors import (
    AmbiguousError,
    IMSPermanentError,
    IMSTransientError,
    NotFoundError,
    UnavailableError,
    UsageError,
)


@pytest.fixture
def clock() -> LinkedClock:
    return LinkedClock()


@pytest.fixture
def ims(clock: LinkedClock) -> FakeIMS:
    return FakeIMS(clock)


@asynccontextmanager
async def running(ims: FakeIMS, clock: LinkedClock, draw: float = 0.0, **kwargs):
    async with trio.open_nursery() as nursery:
        agent = Agent(ims, clock=clock, rng=FixedRandom(draw), **kwargs)
        await nursery.start(agent.run)
        yield agent
        nursery.cancel_scope.cancel()


def transient(**kw) -> IMSTransientError:
    return IMSTransientError("IMS answered 503", http_status=503, **kw)


async def test_add_fetches_at_once_and_serves_from_memory(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        served = await agent.token()
        assert served.token.reveal() == "token-cm-p1-e2-1"
        assert served.expires_in == pytest.approx(DAY - 0.1, abs=0.01)
        for _ in range(50):
            await agent.token(name="p1-e2")
        assert len(ims.calls) == 1


async def test_concurrent_requests_share_one_refresh(autojump_clock, clock, ims):
    ims.latency = 5.0
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        results = []

        async def ask():
            results.append((await agent.token()).token.reveal())

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(ask)
        assert len(ims.calls) == 1
        assert set(results) == {"token-cm-p1-e2-1"}


async def test_refresh_at_a_quarter_of_the_lifetime_left(autojump_clock, clock, ims):
    async with running(ims, clock, draw=0.0) as agent:
        await agent.add(FakeCredential())
        await trio.sleep(64_800 - 1)  # 18 h: the refresh is due when 6 h are left
        assert len(ims.calls) == 1
        await trio.sleep(2)
        assert len(ims.calls) == 2
        assert ims.calls[1][0] == pytest.approx(64_800, abs=0.01)  # sent at 0 + 18 h
        served = await agent.token()
        assert served.token.reveal() == "token-cm-p1-e2-2"
        # Two virtual days: one refresh every 18 h.
        await trio.sleep(2 * DAY)
        assert len(ims.calls) == 4


async def test_jitter_spreads_the_refresh(autojump_clock, clock, ims):
    async with running(ims, clock, draw=1.0) as agent:  # +5 % of the lifetime
        await agent.add(FakeCredential())
        await trio.sleep(DAY * 0.70 - 60)
        assert len(ims.calls) == 1
        await trio.sleep(120)
        assert len(ims.calls) == 2


async def test_suspend_past_the_refresh_time_refreshes_within_a_minute(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await trio.sleep(10)
        clock.suspend(70_000)  # asleep for 19.4 h: trio's timers did not move
        await trio.sleep(61)
        assert len(ims.calls) == 2


async def test_never_serves_an_expired_token_after_a_wall_clock_jump(autojump_clock, clock, ims):
    ims.latency = 3.0
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await agent.token()
        clock.jump_wall(DAY + 10)  # the token is now expired on the wall clock
        start = trio.current_time()
        served = await agent.token()
        assert served.token.reveal() == "token-cm-p1-e2-2"
        assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)  # waited for IMS
        assert served.expires_in > DAY - 10


async def test_transient_failures_retry_with_backoff_and_the_request_still_succeeds(
    autojump_clock, clock, ims
):
    ims.script = [transient(), transient(), transient()]
    async with running(ims, clock, draw=1.0) as agent:
        await agent.add(FakeCredential())
        served = await agent.token()
        assert served.token.reveal() == "token-cm-p1-e2-4"
        gaps = [b[0] - a[0] for a, b in zip(ims.calls, ims.calls[1:], strict=False)]
        # backoff 1, 2, 4 s (draw 1.0) after each 0.1 s IMS call
        assert gaps == pytest.approx([1.1, 2.1, 4.1], abs=0.01)


async def test_retry_after_is_honoured(autojump_clock, clock, ims):
    ims.script = [transient(retry_after=7.0)]
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await agent.token()
        assert ims.calls[1][0] - ims.calls[0][0] == pytest.approx(7.1, abs=0.01)


async def test_old_token_served_while_ims_is_down(autojump_clock, clock, ims):
    async with running(ims, clock, draw=0.5) as agent:
        await agent.add(FakeCredential())
        await agent.token()
        ims.script = [transient()] * 10_000
        await trio.sleep(64_800 + 3600)  # refreshes failing for an hour
        calls = len(ims.calls)
        served = await agent.token()
        assert served.token.reveal() == "token-cm-p1-e2-1"
        assert len(ims.calls) == calls  # serving a valid token does not call IMS
        # the backoff grew to its cap (1 + 299 * draw s between attempts), so the 96 minutes of
        # failures since the refresh came due (at 62 640 s) cost dozens of attempts, not thousands
        assert ims.calls[-1][0] - ims.calls[-2][0] == pytest.approx(150.5 + 0.1)
        assert calls < 50
        desc = describe(agent.resolve(), agent.now())
        assert desc["state"] == "retrying"
        assert "503" in desc["last_error"]


async def test_when_the_cached_token_runs_out_the_error_says_why(autojump_clock, clock, ims):
    async with running(ims, clock, draw=0.5) as agent:
        await agent.add(FakeCredential())
        await agent.token()
        ims.script = [transient()] * 10_000
        await trio.sleep(DAY)
        with pytest.raises(UnavailableError, match="503"):
            await agent.token()


async def test_permanent_failure_stops_retries_until_manual_refresh(autojump_clock, clock, ims):
    ims.script = [IMSPermanentError("IMS refused the credential", error="invalid_client")]
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        for _ in range(20):
            with pytest.raises(UnavailableError, match="invalid_client.*aemagent refresh p1-e2"):
                await agent.token()
            with pytest.raises(UnavailableError):
                await agent.token(min_valid=600)
        await trio.sleep(DAY)
        assert len(ims.calls) == 1
        assert describe(agent.resolve(), agent.now())["state"] == "failed"
        await agent.refresh("p1-e2")
        assert len(ims.calls) == 2
        assert (await agent.token()).token.reveal() == "token-cm-p1-e2-2"


async def test_request_wait_is_capped(autojump_clock, clock, ims):
    ims.gate = trio.Event()  # IMS never answers
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        start = trio.current_time()
        with pytest.raises(UnavailableError, match="did not answer within 20 s"):
            await agent.token()
        assert trio.current_time() - start == pytest.approx(20.0)
        ims.gate.set()


async def test_forgotten_while_in_flight_gets_nothing(autojump_clock, clock, ims):
    ims.gate = trio.Event()
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        outcome = []

        async def ask():
            try:
                await agent.token(name="p1-e2")
            except NotFoundError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(1)
            agent.forget("p1-e2")
            ims.gate.set()
        assert len(outcome) == 1
        assert "no profile named p1-e2" in str(outcome[0])
        assert agent.profiles() == []


async def test_replaced_while_in_flight_never_gets_the_old_identity(autojump_clock, clock, ims):
    ims.gate = trio.Event()
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential(client_id="cm-p1-e2-old", digest="old"), name="work")
        served = []

        async def ask():
            served.append(await agent.token(name="work"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(1)
            ims.gate = None
            await agent.add(FakeCredential(client_id="cm-p1-e2-new", digest="new"), name="work")
            assert agent.resolve("work").credential.client_id == "cm-p1-e2-new"
        assert [s.token.reveal() for s in served] == ["token-cm-p1-e2-new-2"]


async def test_ims_calls_are_capped_across_profiles(autojump_clock, clock, ims):
    ims.latency = 10.0
    async with running(ims, clock, ims_concurrency=4) as agent:
        for i in range(12):
            await agent.add(FakeCredential(client_id=f"cm-p{i}-e1", digest=str(i)), name=f"p{i}")
        await trio.sleep(60)
        assert len(ims.calls) == 12
        assert ims.max_active == 4


async def test_min_valid_is_a_hard_condition(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await trio.sleep(DAY - 3600)  # refreshed once at 18 h; that token has 18 h 59 m left
        assert len(ims.calls) == 2
        served = await agent.token(min_valid=DAY - 1000)
        assert served.expires_in >= DAY - 1000
        assert len(ims.calls) == 3
        with pytest.raises(UsageError, match="longer than a fresh token"):
            await agent.token(min_valid=DAY + 1)


async def test_min_valid_default_serves_short_test_tokens(autojump_clock, clock):
    ims = FakeIMS(clock, lifetime=120)
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await trio.sleep(85)  # refresh due at 30 s left: not yet
        served = await agent.token()
        assert served.token.reveal() == "token-cm-p1-e2-1"


async def test_profile_choice(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        with pytest.raises(NotFoundError, match="no profiles loaded"):
            await agent.token()
        await agent.add(FakeCredential(), hosts=("author-p1-e2.adobeaemcloud.com",))
        await agent.add(FakeCredential(client_id="cm-p3-e4", digest="2"), name="other")
        with pytest.raises(AmbiguousError, match="other, p1-e2"):
            await agent.token()
        served = await agent.token(url="https://author-p1-e2.adobeaemcloud.com/content/x.json")
        assert served.profile.name == "p1-e2"
        with pytest.raises(NotFoundError, match="no profile matches host example.com"):
            await agent.token(url="https://example.com/")
        with pytest.raises(NotFoundError, match="no profile named nope; profiles: other, p1-e2"):
            await agent.token(name="nope")
        await agent.add(
            FakeCredential(client_id="cm-p3-e4", digest="2"), name="other", default=True
        )
        assert (await agent.token()).profile.name == "other"


async def test_derived_name_collision_is_refused(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        other_account = FakeCredential(technical_account_id="TB@techacct.adobe.com", digest="2")
        with pytest.raises(AmbiguousError, match="add this one with --name"):
            await agent.add(other_account)
        # the same identity with a new key (rotated certificate) replaces:
        await agent.add(FakeCredential(digest="rotated"))
        assert agent.resolve().credential.digest == "rotated"


async def test_same_credential_again_keeps_its_token(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await agent.token()
        await agent.add(FakeCredential(), hosts=("a.example",))
        assert (await agent.token()).token.reveal() == "token-cm-p1-e2-1"
        assert len(ims.calls) == 1
        assert agent.resolve().hosts == ("a.example",)


async def test_lifetime_forgets_the_credential(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential(), lifetime=8 * 3600)
        await trio.sleep(8 * 3600 - 1)
        assert agent.profiles()
        await trio.sleep(2)
        assert agent.profiles() == []


async def test_describe_has_no_secrets(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        await agent.token()
        text = repr(describe(agent.resolve(), agent.now()))
        assert "token-cm-p1-e2" not in text
        assert describe(agent.resolve(), agent.now())["token_fingerprint"].startswith("sha256:")


def sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


async def test_forced_refresh_only_for_the_current_token_and_once_a_minute(
    autojump_clock, clock, ims
):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        first = (await agent.token()).token.reveal()
        _, refreshed = await agent.force_refresh("p1-e2", sha("some other token"))
        assert not refreshed
        _, refreshed = await agent.force_refresh("p1-e2", sha(first))
        assert refreshed
        second = (await agent.token()).token.reveal()
        assert second != first
        # the new token refused too, but within a minute: no second IMS call
        await trio.sleep(30)
        _, refreshed = await agent.force_refresh("p1-e2", sha(second).upper())
        assert not refreshed
        await trio.sleep(31)
        _, refreshed = await agent.force_refresh("p1-e2", sha(second))
        assert refreshed
        assert len(ims.calls) == 3


async def test_forced_refresh_never_lifts_a_permanent_block(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential())
        token = (await agent.token()).token.reveal()
        ims.script = [IMSPermanentError("refused", error="invalid_client")]
        await trio.sleep(DAY * 0.76)  # the scheduled refresh fails permanently
        assert agent.resolve().schedule.blocked
        for _ in range(5):
            _, refreshed = await agent.force_refresh("p1-e2", sha(token))
            assert not refreshed
            await trio.sleep(61)
        assert len(ims.calls) == 2


async def test_explicit_hosts_win_over_derived_ones(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        derived = ("*-p1-e2.adobeaemcloud.com",)
        await agent.add(FakeCredential(derived=derived), name="service")
        await agent.add(
            FakeCredential(client_id="dev", digest="2"),
            name="mine",
            hosts=("author-p1-e2.adobeaemcloud.com",),
        )
        pick = agent.resolve
        assert pick(url="https://AUTHOR-p1-e2.adobeaemcloud.com/x").name == "mine"
        assert pick(url="https://publish-p1-e2.adobeaemcloud.com/x").name == "service"
        assert pick(url="preview-p1-e2.adobeaemcloud.com").name == "service"
        with pytest.raises(NotFoundError, match="no profile matches host publish-p1-e22"):
            pick(url="https://publish-p1-e22.adobeaemcloud.com/")
        await agent.add(FakeCredential(derived=derived, digest="3", client_id="x"), name="twin")
        with pytest.raises(AmbiguousError, match="service, twin"):
            pick(url="https://publish-p1-e2.adobeaemcloud.com/")
        assert describe(pick("service"), agent.now())["hosts"] == ["*-p1-e2.adobeaemcloud.com"]


async def test_revoke_asks_ims_and_reports(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        profile = await agent.add(FakeCredential())
        token = profile.token or (await agent.token()).token
        agent.forget("p1-e2")
        said = await agent.revoke(profile, token)
        assert said == "IMS accepted the revocation (HTTP 200)"
        assert ims.revoked == [token.reveal()]
        ims.script = [IMSPermanentError("IMS refused", error="invalid_token")]
        said = await agent.revoke(profile, token)
        assert said.startswith("revocation failed: IMS refused")


def dev_token_for(clock: LinkedClock, *, hours_left: float, lifetime_h: float = 24.0):
    from keys import dev_token

    from aemagent.credentials import parse_credential

    now_ms = clock.now().wall * 1000
    created = now_ms - (lifetime_h - hours_left) * 3600_000
    return parse_credential(
        dev_token(created_at=str(int(created)), expires_in=str(int(lifetime_h * 3600_000)))
    )


async def test_dev_token_is_served_until_it_expires_and_never_refreshed(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        token = dev_token_for(clock, hours_left=3)
        profile = await agent.add(token)
        assert profile.name == "devtoken"
        served = await agent.token()
        assert served.token.reveal() == token.token.reveal()
        # counted as expired 30 s early (IMS's clock stamped it; ours may run slow)
        assert served.expires_in == pytest.approx(3 * 3600 - 30, abs=1)
        await trio.sleep(3 * 3600 - 30 - 61)
        await agent.token()  # 61 s left: still served with the default min_valid (60 s)
        with pytest.raises(UnavailableError, match="only 1m 1s left, less than 120 s"):
            await agent.token(min_valid=120)
        await trio.sleep(62)
        with pytest.raises(UnavailableError, match="expired at .*download a new one"):
            await agent.token()
        with pytest.raises(UsageError, match="cannot be refreshed"):
            await agent.refresh("devtoken")
        assert ims.calls == []
        assert describe(agent.resolve(), agent.now())["state"] == "expired"


async def test_an_expired_dev_token_is_refused_at_add(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        with pytest.raises(UnavailableError, match="expired at"):
            await agent.add(dev_token_for(clock, hours_left=-1))
        assert agent.profiles() == []


async def test_dev_token_suspend_counts(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await agent.add(dev_token_for(clock, hours_left=3))
        clock.suspend(4 * 3600)
        with pytest.raises(UnavailableError, match="expired"):
            await agent.token()


class TaskSteps(trio.abc.Instrument):
    """Records the trio times at which any task ran: with an autojump clock each distinct time
    is one wake-up of the process (time moves only while every task sleeps)."""

    def __init__(self) -> None:
        self.times: set[float] = set()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.times.add(trio.current_time())


def on_the_minute(t: float) -> bool:
    return abs(t / 60 - round(t / 60)) < 1e-9


async def test_idle_profiles_wake_the_process_once_a_minute_together(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        for i in range(10):  # added at ten different moments, so their timers start out of step
            await agent.add(FakeCredential(client_id=f"cm-p{i}-e1", digest=str(i)), name=f"p{i}")
            await trio.sleep(7.3)
        await trio.sleep_until(180.0)
        steps = TaskSteps()
        trio.lowlevel.add_instrument(steps)
        try:
            await trio.sleep_until(180.0 + 3600)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert len(ims.calls) == 10  # nothing was due: only the re-checks ran
        assert all(on_the_minute(t) for t in steps.times), sorted(steps.times)
        assert len(steps.times) <= 61  # once a minute for the hour, not once per profile
        assert len(steps.times) >= 60  # and the re-checks did run


async def test_off_grid_refreshes_retries_and_lifetimes_are_exact(autojump_clock, clock, ims):
    async with running(ims, clock) as agent:
        await trio.sleep(17.3)
        await agent.add(FakeCredential())
        await agent.add(
            FakeCredential(client_id="cm-p3-e4", digest="2"), name="brief", lifetime=100.7
        )
        await trio.sleep_until(17.3 + 100.7 - 0.01)
        assert agent.find("brief") is not None
        await trio.sleep_until(17.3 + 100.7 + 0.01)  # forgotten on time, not on the next minute
        assert agent.find("brief") is None
        ims.script = [transient(retry_after=37.2)]
        await trio.sleep_until(17.3 + 64_800 + 60)
        # the refresh was due at 17.3 s + 18 h (a quarter of the day left); its retry 37.2 s
        # after the failure (IMS answers in 0.1 s)
        assert [t for t, _ in ims.calls if t > 200] == pytest.approx(
            [17.3 + 64_800, 17.3 + 64_800 + 0.1 + 37.2], abs=1e-6
        )


async def test_remembered_resolutions_follow_every_change(autojump_clock, clock, ims):
    """The agent remembers which profile a host (or no name) resolved to; each change that could
    alter the answer must forget it. Broken: a stale answer after forget, default or new hosts."""
    async with running(ims, clock) as agent:
        await agent.add(FakeCredential(), name="a", hosts=("h.example",))
        await agent.add(FakeCredential(client_id="b", digest="2"), name="b", default=True)
        pick = agent.resolve
        assert pick(url="https://h.example/").name == "a"
        assert pick().name == "b"
        # The same credential again, with other hosts: the old host no longer matches.
        await agent.add(FakeCredential(), name="a", hosts=("g.example",))
        with pytest.raises(NotFoundError, match="no profile matches host h.example"):
            pick(url="https://h.example/")
        assert pick(url="g.example").name == "a"
        # Another default.
        await agent.add(FakeCredential(), name="a", hosts=("g.example",), default=True)
        assert pick().name == "a"
        # Forgotten.
        agent.forget("a")
        with pytest.raises(NotFoundError, match="no profile matches host g.example"):
            pick(url="g.example")
        assert pick().name == "b"
        agent.forget("b")
        with pytest.raises(NotFoundError, match="no profiles loaded"):
            pick()
