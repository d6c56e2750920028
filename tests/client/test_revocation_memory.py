"""RevocationSet, the interceptor's in-memory revocations: what it refuses, when it
forgets, and that it stays bounded -- 100 000 revocations come and go, memory returns to
its baseline and a lookup does the same work whatever the set holds.

Pure: no server, an injected clock. Work is shown by counting (Python lines executed,
heap entries popped, bytes allocated), never by timing.
"""

from __future__ import annotations

import random
import sys
import threading
import tracemalloc
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tokensvc_client import Claims, RevocationSet
from tokensvc_client._feed_core import Backoff
from tokensvc_client.revocations import FALLBACK_TTL_SECONDS
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import claims_from_dict

Event = pb.RevocationEvent
T0 = 1_750_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.seconds, out.nanos = int(seconds), round((seconds % 1) * 1e9)
    return out


def event(kind: Any, value: str, expires: float | None, before: float | None = None) -> Any:
    ev = Event(id="", kind=kind, value=value)
    if expires is not None:
        ev.expires_at.CopyFrom(ts(expires))
    if before is not None:
        ev.revoked_before.CopyFrom(ts(before))
    return ev


def claims(
    jti: str = "j1", sid: str = "s1", sub: str = "alice", iat: float = T0, kid: str = "k1"
) -> Claims:
    return claims_from_dict(
        {
            "iss": "https://tokensvc.test",
            "sub": sub,
            "aud": "mesh",
            "exp": int(iat) + 900,
            "iat": int(iat),
            "nbf": int(iat),
            "jti": jti,
            "sid": sid,
        },
        key_id=kid,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def revs(clock: Clock) -> RevocationSet:
    return RevocationSet(clock=clock)


# -- what is refused ---------------------------------------------------------------------


def test_empty_set_refuses_nothing(revs: RevocationSet) -> None:
    assert not revs.is_revoked(claims())
    assert len(revs) == 0


def test_token_revocation_is_by_jti_only(revs: RevocationSet) -> None:
    revs.apply(event(Event.TOKEN, "j1", T0 + 60))
    assert revs.is_revoked(claims(jti="j1"))
    assert not revs.is_revoked(claims(jti="j2"))


def test_session_revocation_covers_every_token_of_the_session(revs: RevocationSet) -> None:
    revs.apply(event(Event.SESSION, "s1", T0 + 60))
    assert revs.is_revoked(claims(jti="a", sid="s1"))
    assert revs.is_revoked(claims(jti="b", sid="s1"))
    assert not revs.is_revoked(claims(jti="c", sid="s2"))


def test_subject_watermark_covers_tokens_issued_before_it(revs: RevocationSet) -> None:
    revs.apply(event(Event.SUBJECT, "alice", T0 + 900, before=T0 + 10.5))
    assert revs.is_revoked(claims(sub="alice", iat=T0))
    assert revs.is_revoked(claims(sub="alice", iat=T0 + 10))  # same second, iat floored
    assert not revs.is_revoked(claims(sub="alice", iat=T0 + 11))  # logged in again after
    assert not revs.is_revoked(claims(sub="bob", iat=T0))


def test_subject_watermark_only_rises(revs: RevocationSet, clock: Clock) -> None:
    revs.apply(event(Event.SUBJECT, "alice", T0 + 900, before=T0 + 20))
    revs.apply(event(Event.SUBJECT, "alice", T0 + 100, before=T0 + 5))  # older, replayed
    assert revs.is_revoked(claims(sub="alice", iat=T0 + 19))
    clock.now = T0 + 500  # the later expiry of the two holds
    assert revs.is_revoked(claims(sub="alice", iat=T0 + 19))


def test_key_revocation_needs_the_key_id_of_the_token(revs: RevocationSet) -> None:
    revs.apply(event(Event.KEY, "k-old", T0 + 900))
    assert revs.is_revoked(claims(kid="k-old"))
    assert not revs.is_revoked(claims(kid="k-new"))
    assert not revs.is_revoked(claims(kid=""))  # claims not from a verified token


def test_reset_keeps_what_is_known_until_it_expires(revs: RevocationSet, clock: Clock) -> None:
    # RESET has no end marker: emptying the set would let revoked tokens through until the
    # snapshot arrives. Revocations are never undone, so keeping the old entries is safe.
    revs.apply(event(Event.TOKEN, "j1", T0 + 60))
    revs.apply(Event(id="r", kind=Event.RESET))
    assert revs.resets == 1
    assert revs.is_revoked(claims(jti="j1"))
    revs.apply(event(Event.TOKEN, "j1", T0 + 60))  # the snapshot sends it again
    assert revs.pending == 1  # no second heap entry for the same expiry
    clock.now = T0 + 60
    assert not revs.is_revoked(claims(jti="j1"))
    assert len(revs) == 0


# -- expiry ------------------------------------------------------------------------------


def test_entries_are_dropped_once_their_tokens_expired(revs: RevocationSet, clock: Clock) -> None:
    revs.apply(event(Event.TOKEN, "j1", T0 + 10))
    revs.apply(event(Event.SESSION, "s1", T0 + 20))
    revs.apply(event(Event.SUBJECT, "alice", T0 + 30, before=T0))
    revs.apply(event(Event.KEY, "k1", T0 + 40))
    assert len(revs) == 4
    for step, left in ((10, 3), (20, 2), (30, 1), (40, 0)):
        clock.now = T0 + step
        revs.is_revoked(claims(jti="other", sid="other", sub="other", kid="other"))
        assert len(revs) == left
    assert revs.pending == 0


def test_an_extended_entry_outlives_its_first_expiry(revs: RevocationSet, clock: Clock) -> None:
    revs.apply(event(Event.SESSION, "s1", T0 + 10))
    revs.apply(event(Event.SESSION, "s1", T0 + 100))
    clock.now = T0 + 50
    revs.prune()
    assert revs.is_revoked(claims(sid="s1"))
    clock.now = T0 + 100
    revs.prune()
    assert len(revs) == 0 and revs.pending == 0


def test_expired_unknown_and_empty_events_are_ignored(revs: RevocationSet) -> None:
    revs.apply(event(Event.TOKEN, "gone", T0 - 1))
    revs.apply(event(Event.KIND_UNSPECIFIED, "x", T0 + 60))
    revs.apply(Event(kind=99, value="x"))  # a kind of a newer server
    revs.apply(event(Event.TOKEN, "", T0 + 60))
    assert len(revs) == 0


def test_an_event_without_expiry_is_kept_for_the_fallback_ttl(
    revs: RevocationSet, clock: Clock
) -> None:
    revs.apply(event(Event.TOKEN, "j1", None))
    clock.now = T0 + FALLBACK_TTL_SECONDS - 1
    assert revs.is_revoked(claims(jti="j1"))
    clock.now = T0 + FALLBACK_TTL_SECONDS
    revs.prune()
    assert len(revs) == 0


def test_backoff_grows_with_jitter_up_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.1, 2.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    for ceiling in ceilings:
        assert ceiling / 2 <= backoff.next_delay() <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)


# -- the memory bound --------------------------------------------------------------------

N = 100_000


def _revoke_many(revs: RevocationSet, n: int, spread: float) -> None:
    """``n`` revocations, mostly jti, some sessions and subjects, expiring within
    ``spread`` seconds (out of order, as a real stream delivers them)."""
    rng = random.Random(6)
    for i in range(n):
        expires = T0 + 1 + rng.random() * spread
        if i % 10 == 0:
            revs.apply(event(Event.SESSION, f"sid-{i}", expires))
        elif i % 100 == 1:
            revs.apply(event(Event.SUBJECT, f"user-{i}", expires, before=T0))
        else:
            revs.apply(event(Event.TOKEN, f"jti-{i:08d}", expires))


def _expire_all(revs: RevocationSet, clock: Clock, start: float) -> None:
    """Let 900 s pass in steps while lookups go on (they prune a little each)."""
    probes = [claims(jti=f"probe-{i}") for i in range(1000)]
    for step in range(1, 11):
        clock.now = start + 1 + 90 * step
        for _ in range(N // 10 // len(probes)):
            for probe in probes:
                revs.is_revoked(probe)


def test_100k_revocations_leave_no_memory_behind_once_expired(
    revs: RevocationSet, clock: Clock
) -> None:
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        _revoke_many(revs, N, spread=900)
        assert len(revs) == N
        held = tracemalloc.get_traced_memory()[0] - base
        assert revs.is_revoked(claims(jti="jti-00000002"))
        _expire_all(revs, clock, T0)
        assert len(revs) == 0 and revs.pending == 0
        first = tracemalloc.get_traced_memory()[0] - base

        # a second wave: what the first left behind is not per entry, it does not grow
        clock.now = T0
        _revoke_many(revs, N, spread=900)
        assert len(revs) == N
        _expire_all(revs, clock, T0)
        assert len(revs) == 0 and revs.pending == 0
        second = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    print(
        f"\n{N} revocations held {held / 1e6:.1f} MB; once expired "
        f"{first / 1e3:.0f} kB above the baseline, {second / 1e3:.0f} kB after a second wave"
    )
    assert held > 10_000_000  # the measurement sees the entries at all
    # what stays is the interpreter's free lists (tuples, floats) and a few small tables:
    # a constant, not a share of what was held
    assert first < held / 50
    assert second - first < 16_000


def test_memory_is_bounded_by_what_is_in_force_not_by_what_was_ever_revoked(
    revs: RevocationSet, clock: Clock
) -> None:
    # a steady stream: 1 000 revocations a second, each in force for 60 s -- the set
    # never holds much more than 60 000, however long it runs
    seen_max = 0
    for second in range(300):
        clock.now = T0 + second
        for i in range(1000):
            revs.apply(event(Event.TOKEN, f"{second}-{i}", clock.now + 60))
        seen_max = max(seen_max, len(revs), revs.pending)
    assert seen_max <= 61_000
    assert len(revs) <= 61_000


# -- lookups are O(1) --------------------------------------------------------------------


#: Python lines a lookup runs without expiry work: the few lines of is_revoked, whatever the
#: set holds (the dict lookups are single C operations)
LOOKUP_LINES = 12


def _lines_executed(fn: Callable[[], object]) -> int:
    """Python lines executed by ``fn`` and whatever Python code it calls."""
    count = 0

    def tracer(frame: FrameType, what: str, arg: object) -> Any:
        nonlocal count
        if what == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    "probe",
    [
        claims(jti="not-revoked", sid="not-revoked", sub="nobody"),
        claims(jti="jti-00000002"),
        claims(jti="x", sid="sid-00"),
    ],
    ids=["miss", "jti-hit", "session-hit"],
)
def test_a_lookup_does_the_same_work_with_10_or_100k_entries(clock: Clock, probe: Claims) -> None:
    small, large = RevocationSet(clock=clock), RevocationSet(clock=clock)
    _revoke_many(small, 10, spread=900)
    small.apply(event(Event.TOKEN, "jti-00000002", T0 + 900))
    small.apply(event(Event.SESSION, "sid-00", T0 + 900))
    _revoke_many(large, N, spread=900)
    large.apply(event(Event.SESSION, "sid-00", T0 + 900))
    assert small.is_revoked(probe) == large.is_revoked(probe)
    work_small = _lines_executed(lambda: small.is_revoked(probe))
    work_large = _lines_executed(lambda: large.is_revoked(probe))
    assert work_small == work_large
    assert work_large <= LOOKUP_LINES


def test_expiry_work_per_lookup_is_bounded(revs: RevocationSet, clock: Clock) -> None:
    # everything expires at once: no single lookup pays for it all
    _revoke_many(revs, N, spread=10)
    clock.now = T0 + 100
    works, pops = [], []
    probe = claims(jti="probe")
    while len(revs):
        before = revs.pruned
        works.append(_lines_executed(lambda: revs.is_revoked(probe)))
        pops.append(revs.pruned - before)
    assert max(pops) == RevocationSet.PRUNE_BATCH
    assert sum(pops) == N
    assert max(works) - min(works[:-1]) < 20 * RevocationSet.PRUNE_BATCH  # bounded
    # and once pruned, a lookup is back to its constant cost
    assert _lines_executed(lambda: revs.is_revoked(probe)) <= LOOKUP_LINES


# -- threads -----------------------------------------------------------------------------


def test_lookups_from_many_threads_while_events_arrive(revs: RevocationSet, clock: Clock) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    misses: list[str] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                # j0 is revoked before the readers start and never expires in this test
                if not revs.is_revoked(claims(jti="j0")):
                    misses.append("j0")
                revs.is_revoked(claims(jti="j-random", sid="s-random"))
        except BaseException as err:
            errors.append(err)

    revs.apply(event(Event.TOKEN, "j0", T0 + 10_000))
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    for second in range(50):
        clock.now = T0 + second
        for i in range(2000):
            revs.apply(event(Event.TOKEN, f"{second}-{i}", clock.now + 5))
    stop.set()
    for t in readers:
        t.join()
    assert not errors and not misses
    assert len(revs) <= 5 * 2000 + 1 + RevocationSet.PRUNE_BATCH
