"""The single-flight refresher on its own (pure asyncio logic, a small fake refresh call
with an injected clock; the real-server behaviour is in test_refresh.py)."""

from __future__ import annotations

import asyncio

import pytest

from tokensvc_client.errors import Unauthenticated
from tokensvc_client.results import TokenPair
from tokensvc_client.web.refresh import Refresher, StoredSession


def _pair(n: int, now: float, sid: str = "s1") -> TokenPair:
    return TokenPair(f"at{n}@{sid}", f"rt{n}@{sid}", "Bearer", now + 10, now + 1000, sid)


class FakeRefresh:
    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.spent: list[str] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, refresh_token: str) -> TokenPair:
        self.spent.append(refresh_token)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return _pair(len(self.spent), self.clock[0], sid=refresh_token.split("@")[1])


def _refresher(fake: FakeRefresh, clock: list[float], **kw) -> Refresher:
    return Refresher(fake, margin=5, memory=30, clock=lambda: clock[0], **kw)


def test_one_refresh_for_many_callers_and_a_cancelled_caller_cancels_nothing():
    async def main() -> None:
        clock = [1000.0]
        fake = FakeRefresh(clock)
        refresher = _refresher(fake, clock)
        old = StoredSession.of(_pair(0, 990), 990, 5)
        waiters = [asyncio.ensure_future(refresher.refresh(old)) for _ in range(50)]
        await asyncio.sleep(0)
        waiters[0].cancel()
        fake.gate.set()
        results = await asyncio.gather(*waiters[1:])
        assert fake.spent == ["rt0@s1"]
        assert {r.tokens.refresh_token for r in results} == {"rt1@s1"}
        assert results[0].refresh_at == pytest.approx(1000 + 10 - 5)
        # the spent token now maps to the newest pair, without another call
        assert refresher.newest(old).tokens.refresh_token == "rt1@s1"

    asyncio.run(main())


def test_a_failure_reaches_every_waiter_and_the_next_call_tries_again():
    async def main() -> None:
        clock = [1000.0]
        fake = FakeRefresh(clock)
        fake.fail = Unauthenticated("invalid token: revoked")
        refresher = _refresher(fake, clock)
        old = StoredSession.of(_pair(0, 990), 990, 5)
        waiters = [asyncio.ensure_future(refresher.refresh(old)) for _ in range(5)]
        fake.gate.set()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(o, Unauthenticated) for o in outcomes)
        assert fake.spent == ["rt0@s1"]
        fake.fail = None
        assert (await refresher.refresh(old)).tokens.refresh_token == "rt2@s1"
        assert refresher.newest(old).tokens.refresh_token == "rt2@s1"

    asyncio.run(main())


def test_spent_tokens_are_forgotten_after_the_memory_time_and_bounded():
    async def main() -> None:
        clock = [1000.0]
        fake = FakeRefresh(clock)
        fake.gate.set()
        refresher = _refresher(fake, clock, max_sessions=3)
        sessions = [StoredSession.of(_pair(0, 990, sid=f"s{i}"), 990, 5) for i in range(5)]
        for stored in sessions:
            await refresher.refresh(stored)
        # only the 3 newest sessions are remembered
        remembered = [refresher.newest(s) is not s for s in sessions]
        assert remembered == [False, False, True, True, True]
        clock[0] += 31
        assert all(refresher.newest(s) is s for s in sessions)

    asyncio.run(main())


def test_a_stale_token_of_the_session_never_joins_its_refresh():
    # an old cookie of the same session (its refresh token spent long ago -- stolen, say)
    # must not ride along on the session's refresh and get its new pair: it goes to
    # tokensvc on its own, which answers reuse and ends the session
    async def main() -> None:
        clock = [1000.0]
        fake = FakeRefresh(clock)
        refresher = _refresher(fake, clock)
        current = StoredSession.of(_pair(5, 990), 990, 5)
        stale = StoredSession.of(_pair(1, 900), 900, 5)
        first = asyncio.ensure_future(refresher.refresh(current))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(refresher.refresh(stale))
        await asyncio.sleep(0)
        fake.gate.set()
        await asyncio.gather(first, second)
        assert fake.spent == ["rt5@s1", "rt1@s1"]  # each spent by its own call

    asyncio.run(main())
