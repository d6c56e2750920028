"""Refresh families: rotation, reuse detection, concurrency, idle and absolute expiry
(docs/design.md, Refresh families)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import redis

from tests.support import wait_until
from tests.support.rpc import code_of
from tokensvc.config import Rate
from tokensvc.families.tokens import refresh_hash
from tokensvc.store import family_key
from tokensvc_client.v1 import tokensvc_pb2 as pb


def _refresh(stub, token):
    return stub.Refresh(pb.RefreshRequest(refresh_token=token)).tokens


def _active(stub, token) -> bool:
    return stub.Introspect(pb.IntrospectRequest(token=token)).active


def test_refresh_rotates_and_spends_the_presented_token(stub):
    first = stub.Issue(pb.IssueRequest(subject="alice", roles=["r"], client_id="web")).tokens
    second = _refresh(stub, first.refresh_token)
    assert second.session_id == first.session_id
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    assert not _active(stub, first.refresh_token)
    assert _active(stub, second.refresh_token)
    info = stub.Introspect(pb.IntrospectRequest(token=second.access_token))
    assert (info.subject, list(info.roles), info.client_id) == ("alice", ["r"], "web")
    third = _refresh(stub, second.refresh_token)
    assert third.session_id == first.session_id


def test_reuse_of_a_rotated_token_revokes_the_whole_family(stub):
    first = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    second = _refresh(stub, first.refresh_token)
    assert code_of(lambda: _refresh(stub, first.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED
    # the thief's replay killed the legitimate holder's tokens too
    assert not _active(stub, second.refresh_token)
    assert not _active(stub, second.access_token)
    assert not _active(stub, first.access_token)
    assert code_of(lambda: _refresh(stub, second.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED


def test_reuse_does_not_touch_other_sessions_of_the_subject(stub):
    victim = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    other = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    _refresh(stub, victim.refresh_token)
    code_of(lambda: _refresh(stub, victim.refresh_token))
    assert _active(stub, other.access_token) and _active(stub, other.refresh_token)


def test_a_guessed_token_for_a_known_session_does_not_revoke_it(stub):
    pair = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    forged = f"tsr1_{pair.session_id}_{'0' * 64}"
    assert code_of(lambda: _refresh(stub, forged)) == grpc.StatusCode.UNAUTHENTICATED
    assert _active(stub, pair.refresh_token) and _active(stub, pair.access_token)


def test_fifty_concurrent_refreshes_with_one_token_yield_exactly_one_success(
    make_settings, start_server
):
    # 49 refused refreshes from one peer: the failed-authentication limit would answer
    # some with RESOURCE_EXHAUSTED; this test is about the rotation's atomicity alone
    tokensvc = start_server(make_settings(rate_auth_failures=Rate(0, 1)))
    stub = tokensvc.stub()
    pair = stub.Issue(pb.IssueRequest(subject="alice")).tokens

    def attempt(_: int) -> str | None:
        try:
            return _refresh(stub, pair.refresh_token).refresh_token
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return None

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(attempt, range(50)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    # the 49 losers presented a spent token: reuse, so the family is revoked
    assert not _active(stub, winners[0])


def test_only_hashes_of_refresh_tokens_are_stored(stub, redis_url):
    pair = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    nxt = _refresh(stub, pair.refresh_token)
    client = redis.Redis.from_url(redis_url)
    dump = b"".join(
        k + b"".join(client.hgetall(k).keys()) + b"".join(client.hgetall(k).values())
        for k in client.keys("ts:{*}:fam:*")
    )
    assert pair.refresh_token.encode() not in dump and nxt.refresh_token.encode() not in dump
    fields = client.hgetall(family_key(pair.session_id))
    assert fields[b"cur"].decode() == refresh_hash(nxt.refresh_token)
    # the spent token is recognised by its generation and MAC, not remembered
    assert fields[b"gen"] == b"2" and not [f for f in fields if f.startswith(b"u:")]


def test_refresh_token_idle_expiry(make_settings, start_server):
    stub = start_server(make_settings(refresh_idle_ttl=1)).stub()
    pair = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    wait_until(lambda: not _active(stub, pair.refresh_token), what="the refresh token idle")
    assert code_of(lambda: _refresh(stub, pair.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED


def test_absolute_family_lifetime_ends_the_session(make_settings, start_server, redis_url):
    stub = start_server(make_settings(family_max_age=3, refresh_idle_ttl=3)).stub()
    pair = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    # access tokens never outlive their family
    assert pair.access_expires_at.seconds <= pair.refresh_expires_at.seconds
    nxt = _refresh(stub, pair.refresh_token)
    assert nxt.refresh_expires_at.seconds <= pair.refresh_expires_at.seconds
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: not client.exists(family_key(pair.session_id)), what="the family gone")
    assert code_of(lambda: _refresh(stub, nxt.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED
    assert not _active(stub, nxt.access_token)
    assert not redis.Redis.from_url(redis_url).exists(family_key(pair.session_id))
