"""WatchRevocations' resources: streams per client are capped, and a new stream's catch-up
comes from the process's memory (its one reader), not from a Redis scan of its own --
correct across the reader losing Redis. Real Redis, real gRPC."""

from __future__ import annotations

import time

import grpc
import pytest
import redis

from tests.support.feed import Watcher
from tokensvc_client.v1 import tokensvc_pb2 as pb

Kind = pb.RevocationEvent


def _xrange_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_xrange", {}).get("calls", 0))


def _refusal(watcher: Watcher, timeout: float = 5.0) -> grpc.RpcError:
    deadline = time.monotonic() + timeout
    while watcher.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watcher.error is not None
    return watcher.error


def test_streams_per_client_are_capped(mtls_service):
    svc = mtls_service("", max_watchers_per_client=2)
    orders = svc.stub("orders")
    first, second = Watcher(orders), Watcher(orders)
    try:
        assert first.next().kind == Kind.RESET and second.next().kind == Kind.RESET
        third = Watcher(orders)
        assert _refusal(third).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        other = Watcher(svc.stub("billing"))  # another client keeps its own allowance
        assert other.next().kind == Kind.RESET
        first.close()
        deadline = time.monotonic() + 5
        while True:  # the closed stream's slot comes back
            again = Watcher(orders)
            try:
                assert again.next(timeout=1).kind == Kind.RESET
                break
            except Exception:
                assert time.monotonic() < deadline
                again.close()
        again.close()
        other.close()
    finally:
        first.close()
        second.close()


def test_new_watchers_catch_up_from_memory_not_from_redis(tokensvc, stub, redis_url):
    client = redis.Redis.from_url(redis_url)
    sessions = [stub.Issue(pb.IssueRequest(subject=f"u{i}")).tokens.session_id for i in range(5)]
    for sid in sessions:
        stub.Revoke(pb.RevokeRequest(session_id=sid))
    time.sleep(0.3)  # the reader has read them
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
        deadline = time.monotonic() + 10
        while True:
            try:
                sid = stub.Issue(pb.IssueRequest(subject="alice")).tokens.session_id
                stub.Revoke(pb.RevokeRequest(session_id=sid))
                return sid
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise

    before = revoke()
    first = Watcher(stub)
    assert [e.value for e in first.take(2)] == ["", before]
    client.client_kill_filter(_type="normal", skipme=True)  # every connection of tokensvc
    assert _refusal(first).code() == grpc.StatusCode.UNAVAILABLE
    during = revoke()
    deadline = time.monotonic() + 10
    while True:  # refused (UNAVAILABLE) until the reader reads again, then complete
        fresh = Watcher(stub)
        try:
            events = fresh.take(3)
            break
        except Exception:
            assert time.monotonic() < deadline, fresh.error
            fresh.close()
            time.sleep(0.1)
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
    from tokensvc.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match="max-watchers-per-client"):
        parse_args(["--insecure", "--max-watchers-per-client", value])
    assert make_settings(max_watchers_per_client=3).max_watchers_per_client == 3
