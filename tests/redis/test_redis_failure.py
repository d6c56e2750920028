"""Redis going away: UNAVAILABLE, nothing half-written, and service resumes when it is back."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tests.support import until_available
from tokensvc.redis.embedded import RedisProcess
from tokensvc_client.v1 import tokensvc_pb2 as pb


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisProcess]:
    # a unix socket: no other process can take its address while it is down
    proc = RedisProcess(tmp_path / "own-redis", unix_socket=True).start()
    yield proc
    proc.stop()


def test_redis_down_is_unavailable_then_service_resumes(own_redis, make_settings, start_server):
    stub = start_server(make_settings(redis_url=own_redis.url)).stub()
    pair = stub.Issue(pb.IssueRequest(subject="alice")).tokens

    own_redis.stop()
    calls = {
        "Issue": lambda: stub.Issue(pb.IssueRequest(subject="alice")),
        "Refresh": lambda: stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)),
        "Introspect": lambda: stub.Introspect(pb.IntrospectRequest(token=pair.access_token)),
        "Revoke": lambda: stub.Revoke(pb.RevokeRequest(session_id=pair.session_id)),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
        assert "Traceback" not in err.value.details()
    # public keys are served from memory: verifiers keep working while Redis is away
    assert stub.GetKeys(pb.GetKeysRequest()).jwks

    own_redis.start()  # same port and data directory: the append-only file is replayed
    # the failed Refresh above wrote nothing: the original token is still the current one
    nxt = until_available(
        lambda: stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))
    ).tokens
    # (a pooled connection from before the restart refuses once: UNAVAILABLE, then fine)
    assert until_available(
        lambda: stub.Introspect(pb.IntrospectRequest(token=nxt.access_token))
    ).active
    assert until_available(lambda: stub.Issue(pb.IssueRequest(subject="bob"))).tokens.access_token


def test_server_refuses_to_start_without_redis(make_settings, start_server):
    from tokensvc.redis.embedded import free_port

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Exception, match=r"(?i)redis|connect"):
        start_server(settings)


def test_a_hung_redis_is_unavailable_within_the_timeout_then_service_resumes(
    own_redis, make_settings, start_server
):
    """A Redis that stops answering (SIGSTOP: the connection stays open, no reply comes)
    fails calls UNAVAILABLE after about --redis-timeout (the watchdog closes the silent
    connection), and the service works again once Redis does."""
    import os
    import signal

    stub = start_server(make_settings(redis_url=own_redis.url, redis_timeout=1.0)).stub()
    stub.Issue(pb.IssueRequest(subject="alice"))
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        # UNAVAILABLE, not DEADLINE_EXCEEDED: the 1 s Redis timeout ended it, not the
        # caller's 20 s deadline (no time is asserted: the machine may be busy)
        with pytest.raises(grpc.RpcError) as err:
            stub.Issue(pb.IssueRequest(subject="alice"), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    until_available(lambda: stub.Issue(pb.IssueRequest(subject="alice")))


def test_scripts_flushed_from_redis_are_loaded_again(own_redis, make_settings, start_server):
    """After SCRIPT FLUSH (a restarted Redis, a failover to a fresh replica) the next call
    gets NOSCRIPT, which means the script did not run: it is loaded and run once."""
    import redis

    stub = start_server(make_settings(redis_url=own_redis.url)).stub()
    redis.Redis.from_url(own_redis.url).script_flush()
    pairs = [stub.Issue(pb.IssueRequest(subject="alice")).tokens for _ in range(2)]
    listed = stub.ListSessions(pb.ListSessionsRequest(subject="alice")).sessions
    assert {s.session_id for s in listed} == {p.session_id for p in pairs}
