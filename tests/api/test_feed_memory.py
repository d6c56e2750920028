"""WatchRevocations' resources: streams per client are capped, and a new stream's catch-up
comes from the process's memory (its one reader), not from a Redis scan of its own --
correct across the reader losing Redis. Real Redis, real gRPC."""

from __future__ import annotations

import queue

import grpc
import pytest
import redis

from tests.support import until_available, wait_until
from tests.support.feed import Watcher
from tokensvc_client.v1 import tokensvc_pb2 as pb

Kind = pb.RevocationEvent


def _xrange_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))


def test_streams_per_client_are_capped(mtls_service):
    svc = mtls_service("", max_watchers_per_client=2)
    orders = svc.stub("orders")
    first, second = Watcher(orders), Watcher(orders)
    try:
        assert first.next().kind == Kind.RESET and second.next().kind == Kind.RESET
        third = Watcher(orders)
        assert third.refusal().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = Watcher(svc.stub("billing"))  # another client keeps its own allowance
        assert other.next().kind == Kind.RESET
        first.close()

        def reopened() -> Watcher | None:
            again = Watcher(orders)
            try:
                if again.next(timeout=1).kind == Kind.RESET:
                    return again
            except queue.Empty:
                pass
            again.close()
            return None

        wait_until(reopened, 5, what="the closed stream's slot back", interval=0).close()
        other.close()
    finally:
        first.close()
        second.close()


def test_new_watchers_catch_up_from_memory_not_from_redis(tokensvc, stub, redis_url):
    client = redis.Redis.from_url(redis_url)
    sessions = [stub.Issue(pb.IssueRequest(subject=f"u{i}")).tokens.session_id for i in range(5)]
    for sid in sessions:
        stub.Revoke(pb.RevokeRequest(session_id=sid))
    probe = Watcher(stub)  # once a stream has them all, the one reader has read them
    assert [e.value for e in probe.take(1 + len(sessions))][1:] == sessions
    probe.close()
    before = _xrange_calls(client)
    watchers = [Watcher(stub) for _ in range(10)]
    try:
        for watcher in watchers:
            events = watcher.take(1 + len(sessions))
            assert events[0].kind == Kind.RESET
            assert [e.value for e in events[1:]] == sessions
        resumed = Watcher(stub, resume_from=events[2].id)
        assert [e.value for e in resumed.take(3)] == sessions[2:]
        resumed.close()
        assert _xrange_calls(client) == before  # not one scan for eleven streams
    finally:
        for watcher in watchers:
            watcher.close()


def test_catch_up_stays_complete_across_the_reader_losing_redis(tokensvc, stub, redis_url):
    client = redis.Redis.from_url(redis_url)

    def revoke() -> str:
        # after the kill, a pooled connection's first command may fail (UNAVAILABLE):
        # the caller retries, as clients do
        sid = until_available(
            lambda: stub.Issue(pb.IssueRequest(subject="alice")).tokens.session_id, 10
        )
        until_available(lambda: stub.Revoke(pb.RevokeRequest(session_id=sid)), 10)
        return sid

    before = revoke()
    first = Watcher(stub)
    assert [e.value for e in first.take(2)] == ["", before]
    client.client_kill_filter(_type="normal", skipme=True)  # every connection of tokensvc
    assert first.refusal().code() == grpc.StatusCode.UNAVAILABLE
    during = revoke()

    def caught_up() -> tuple[Watcher, list[pb.RevocationEvent]] | None:
        fresh = Watcher(stub)
        try:
            return fresh, fresh.take(3)
        except queue.Empty:  # refused (UNAVAILABLE) until the reader reads again
            fresh.close()
            return None

    # then complete
    fresh, events = wait_until(caught_up, 10, what="a new stream to catch up", interval=0.1)
    try:
        assert events[0].kind == Kind.RESET
        assert [e.value for e in events[1:]] == [before, during]
        resumed = Watcher(stub, resume_from=events[1].id)
        assert [e.value for e in resumed.take(1)] == [during]
        live = revoke()
        assert [fresh.next().value, resumed.next().value] == [live, live]
        resumed.close()
    finally:
        fresh.close()


@pytest.mark.parametrize("value", ["0", "10001"])
def test_the_cap_is_validated(make_settings, value):
    from tokensvc.config import ConfigError
    from tokensvc.config.env import parse_args

    with pytest.raises(ConfigError, match="max-watchers-per-client"):
        parse_args(["--insecure", "--max-watchers-per-client", value])
    assert make_settings(max_watchers_per_client=3).max_watchers_per_client == 3
