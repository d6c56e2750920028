"""WatchRevocations at the service: every kind of revocation reaches the stream, a new
watcher gets RESET and what is in force, a returning one resumes where it left off."""

from __future__ import annotations

import queue

import grpc
import pytest

from tests.support import subject_tags
from tests.support.feed import Watcher
from tokensvc_client.v1 import tokensvc_pb2 as pb

Kind = pb.RevocationEvent


@pytest.fixture
def tag(tokensvc):
    """A subject's tag in this deployment: the feed names subjects only by it."""
    return subject_tags(tokensvc.settings).of


@pytest.fixture
def watch(tokensvc):
    watchers: list[Watcher] = []

    def start(resume_from: str = "", stub=None) -> Watcher:
        watcher = Watcher(stub or tokensvc.stub(), resume_from)
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        watcher.close()


def _kinds(events) -> list[tuple[int, str]]:
    return [(e.kind, e.value) for e in events]


def test_every_revocation_kind_reaches_the_feed(stub, watch):
    watcher = watch()
    assert watcher.next().kind == Kind.RESET
    a = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    b = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    c = stub.Issue(pb.IssueRequest(subject="bob")).tokens
    d = stub.Issue(pb.IssueRequest(subject="carol")).tokens

    stub.Revoke(pb.RevokeRequest(token=a.access_token))
    token_event = watcher.next()
    jti_claims = stub.Introspect(pb.IntrospectRequest(token=a.access_token))
    assert not jti_claims.active
    assert token_event.kind == Kind.TOKEN and token_event.expires_at.seconds > 0

    stub.Revoke(pb.RevokeRequest(session_id=b.session_id))
    assert _kinds([watcher.next()]) == [(Kind.SESSION, b.session_id)]

    stub.Revoke(pb.RevokeRequest(subject="alice"))  # a is still active: one session + subject
    events = watcher.take(2)
    # the subject is named by its tag (the start of its session ids), never in clear
    assert _kinds(events) == [(Kind.SESSION, a.session_id), (Kind.SUBJECT, a.session_id[:32])]
    assert events[1].revoked_before.ToMilliseconds() > 0

    rotated = stub.Refresh(pb.RefreshRequest(refresh_token=c.refresh_token)).tokens
    with pytest.raises(grpc.RpcError) as err:
        stub.Refresh(pb.RefreshRequest(refresh_token=c.refresh_token))  # reuse
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _kinds([watcher.next()]) == [(Kind.SESSION, rotated.session_id)]

    stub.LockSubject(pb.LockSubjectRequest(subject="carol"))
    assert _kinds(watcher.take(2)) == [
        (Kind.SESSION, d.session_id),
        (Kind.SUBJECT, d.session_id[:32]),
    ]

    old_kid = stub.ListKeys(pb.ListKeysRequest()).keys[0].kid
    stub.RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True))
    assert _kinds([watcher.next()]) == [(Kind.KEY, old_kid)]

    # revoking what is revoked already, or a guessed session, adds nothing
    stub.Revoke(pb.RevokeRequest(session_id=b.session_id))
    stub.Revoke(pb.RevokeRequest(token=c.refresh_token))
    with pytest.raises(queue.Empty):
        watcher.next(timeout=0.5)


def test_a_new_watcher_gets_reset_then_what_is_in_force(stub, watch, tag):
    a = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    stub.Revoke(pb.RevokeRequest(session_id=a.session_id))
    stub.Revoke(pb.RevokeRequest(subject="bob"))
    watcher = watch()
    events = watcher.take(3)
    assert events[0].kind == Kind.RESET
    assert _kinds(events[1:]) == [(Kind.SESSION, a.session_id), (Kind.SUBJECT, tag("bob"))]


def test_a_returning_watcher_resumes_without_losing_anything(stub, watch, tag):
    first = watch()
    assert first.next().kind == Kind.RESET
    stub.Revoke(pb.RevokeRequest(subject="one"))
    last_seen = first.next().id
    first.close()
    stub.Revoke(pb.RevokeRequest(subject="two"))  # while disconnected
    stub.Revoke(pb.RevokeRequest(subject="three"))
    again = watch(resume_from=last_seen)
    assert _kinds(again.take(2)) == [(Kind.SUBJECT, tag("two")), (Kind.SUBJECT, tag("three"))]
    stub.Revoke(pb.RevokeRequest(subject="four"))  # and live after the catch-up
    assert _kinds([again.next()]) == [(Kind.SUBJECT, tag("four"))]


def test_resume_from_an_id_the_stream_no_longer_holds_starts_over(stub, watch, tag):
    stub.Revoke(pb.RevokeRequest(subject="one"))
    watcher = watch(resume_from="1-0")  # older than anything held: events may be lost
    assert watcher.next().kind == Kind.RESET
    assert _kinds([watcher.next()]) == [(Kind.SUBJECT, tag("one"))]


@pytest.mark.parametrize(
    "resume_from",
    ["../etc", "18446744073709551616-0", "1-18446744073709551616", "99999999999999999999-0"],
)
def test_resume_from_must_be_an_event_id(stub, resume_from):
    """Both parts of a stream id are unsigned 64-bit: 2**64 and above are not ids."""
    call = stub.WatchRevocations(pb.WatchRevocationsRequest(resume_from=resume_from))
    with pytest.raises(grpc.RpcError) as err:
        next(iter(call))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_any_workload_of_the_mesh_may_watch(mtls_service):
    svc = mtls_service("")
    watcher = Watcher(svc.stub("orders"))
    try:
        assert watcher.next().kind == Kind.RESET
    finally:
        watcher.close()


def test_shutdown_ends_open_watches_with_unavailable(make_settings, start_server):
    # a draining server must not wait its grace period for streams that never end: with
    # a grace beyond the test timeout, this test only passes if the watches are ended
    srv = start_server(make_settings(grace_seconds=300))
    watcher = Watcher(srv.stub())
    assert watcher.next().kind == Kind.RESET
    srv.stop(grace=300)
    assert watcher.refusal().code() == grpc.StatusCode.UNAVAILABLE


def test_a_watcher_that_connects_before_the_reader_starts_misses_nothing(redis_url):
    """The reader's starting point is fixed before any watcher catches up; otherwise an
    event between a watcher's catch-up and the reader's first read would be lost to it."""
    import asyncio
    import time

    import redis.asyncio as aioredis

    from tokensvc.api.revocation_hub import RevocationHub
    from tokensvc.store import REVOCATIONS

    exp = str(int(time.time() * 1000) + 600_000)

    async def main() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)

        async def revoke(sid: str) -> None:
            await client.xadd(REVOCATIONS, {"kind": "session", "value": sid, "exp": exp})

        got: list[str] = []

        async def consume(hub: RevocationHub) -> None:
            async for event in hub.watch(""):
                got.append(event.value or "RESET")

        await revoke("a")
        hub = RevocationHub(client, block_ms=100)
        watcher = asyncio.create_task(consume(hub))
        while len(got) < 2:  # RESET, a
            await asyncio.sleep(0.01)
        await revoke("b")  # before the reader's first read
        reader = asyncio.create_task(hub.run())
        await revoke("c")
        while len(got) < 4:
            await asyncio.sleep(0.01)
        reader.cancel()
        watcher.cancel()
        await asyncio.gather(reader, watcher, return_exceptions=True)
        await client.aclose()
        return got

    assert asyncio.run(asyncio.wait_for(main(), 10)) == ["RESET", "a", "b", "c"]
