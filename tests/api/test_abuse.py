"""Abuse resistance: shared rate limits, the failed-authentication limit, subject lock,
transport caps. Real Redis, real gRPC (mTLS where identities matter)."""

from __future__ import annotations

import secrets

import grpc
import pytest
import redis

from tests.support.rpc import refused
from tokensvc.api.admission import Caller, network_of
from tokensvc.config import Rate
from tokensvc.families.tokens import tag_of
from tokensvc.store import subject_key
from tokensvc_client.peer import ANONYMOUS
from tokensvc_client.v1 import tokensvc_pb2 as pb

ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
LOGIN = "spiffe://tokensvc.test/ns/auth/sa/login"
POLICY = f"""
[rpc.Issue]
allow = ["{LOGIN}"]
[rpc.LockSubject]
allow = ["{ADMIN}"]
[rpc.UnlockSubject]
allow = ["{ADMIN}"]
"""


def _retry_after(err: grpc.RpcError) -> int:
    trailers = dict(err.trailing_metadata() or ())
    return int(trailers["retry-after"])


def test_issue_is_limited_per_subject_across_replicas(make_settings, start_server):
    settings = make_settings(rate_issue=Rate(3, 60))
    a, b = start_server(settings), start_server(settings)
    stub_a, stub_b = a.stub(), b.stub()
    stub_a.Issue(pb.IssueRequest(subject="alice"))
    stub_a.Issue(pb.IssueRequest(subject="alice"))
    stub_b.Issue(pb.IssueRequest(subject="alice"))
    err = refused(lambda: stub_b.Issue(pb.IssueRequest(subject="alice")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= _retry_after(err) <= 20  # one token every 20 s
    assert stub_a.Issue(pb.IssueRequest(subject="bob")).tokens.access_token  # per subject


def _forged(session_id: str) -> pb.RefreshRequest:
    """A refresh token for a real session that the family never issued."""
    return pb.RefreshRequest(refresh_token=f"tsr1_{session_id}_{secrets.token_hex(32)}")


def _mac_flipped(token: str) -> pb.RefreshRequest:
    """A genuine v2 refresh token with its MAC altered: names the same session, forged."""
    return pb.RefreshRequest(refresh_token=token[:-1] + ("1" if token[-1] == "0" else "0"))


def test_one_users_failures_through_a_relay_never_refuse_another_users_refresh(mtls_service):
    # "orders" relays its users' refreshes under one mTLS identity (a web backend); one of
    # its users sends garbage, some of it naming another user's session id (ids are not
    # secrets: they are logged, audited and carried in every access token as sid)
    svc = mtls_service(POLICY, rate_auth_failures=Rate(3, 60))
    login, orders = svc.stub("login"), svc.stub("orders")
    alice = login.Issue(pb.IssueRequest(subject="alice")).tokens
    bob = login.Issue(pb.IssueRequest(subject="bob")).tokens
    garbage = [
        _forged(alice.session_id),  # v1 format: no MAC proves whose it is
        _mac_flipped(alice.refresh_token),  # v2 format, forged MAC
        _forged(secrets.token_hex(32)),
        pb.RefreshRequest(refresh_token="tsr1_garbage"),
    ]
    for _ in range(5):  # well past the per-user burst of 3
        for request in garbage:
            assert refused(lambda r=request: orders.Refresh(r)).code() == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    # every user of the relay refreshes as usual -- alice too: a token that does not prove
    # which session it is counts against no session, only the relay's bulk limit
    bob_next = orders.Refresh(pb.RefreshRequest(refresh_token=bob.refresh_token)).tokens
    assert orders.Refresh(pb.RefreshRequest(refresh_token=bob_next.refresh_token)).tokens
    assert orders.Introspect(pb.IntrospectRequest(token=alice.refresh_token)).active
    assert orders.Refresh(pb.RefreshRequest(refresh_token=alice.refresh_token)).tokens


def test_a_flood_far_beyond_one_user_limits_the_relaying_peer_and_only_it(mtls_service):
    svc = mtls_service(
        POLICY, rate_auth_failures=Rate(3, 60), rate_auth_failures_relay=Rate(10, 60)
    )
    login, orders, billing = svc.stub("login"), svc.stub("orders"), svc.stub("billing")
    pair = login.Issue(pb.IssueRequest(subject="alice")).tokens
    for _ in range(11):  # each naming another session: only the relay-wide count grows
        assert refused(lambda: orders.Refresh(_forged(secrets.token_hex(32)))).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    good = pb.RefreshRequest(refresh_token=pair.refresh_token)
    err = refused(lambda: orders.Refresh(good))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert orders.GetKeys(pb.GetKeysRequest()).jwks  # public keys stay reachable
    assert billing.Refresh(good).tokens.refresh_token  # another peer is not limited


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("127.0.0.1", "127.0.0.0/8"),
        ("127.45.6.7", "127.0.0.0/8"),
        ("10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("::1", "::/64"),
        ("unix:/run/tokensvc.sock", "unix:/run/tokensvc.sock"),
    ],
)
def test_anonymous_callers_are_counted_per_network(address, network):
    assert network_of(address) == network
    assert Caller(ANONYMOUS, address).key == f"net:{network}"


def test_per_peer_refresh_limit_refuses_before_rotating(mtls_service):
    svc = mtls_service(POLICY, rate_refresh=Rate(2, 60))
    login, orders = svc.stub("login"), svc.stub("orders")
    tokens = [login.Issue(pb.IssueRequest(subject=f"user{i}")).tokens for i in range(3)]
    orders.Refresh(pb.RefreshRequest(refresh_token=tokens[0].refresh_token))
    orders.Refresh(pb.RefreshRequest(refresh_token=tokens[1].refresh_token))
    third = pb.RefreshRequest(refresh_token=tokens[2].refresh_token)
    err = refused(lambda: orders.Refresh(third))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert svc.stub("billing").Refresh(third).tokens  # still the current token: not rotated


def test_per_peer_introspect_limit(mtls_service):
    svc = mtls_service(POLICY, rate_introspect=Rate(2, 60))
    orders = svc.stub("orders")
    for _ in range(2):
        orders.Introspect(pb.IntrospectRequest(token="a.b.c"))
    err = refused(lambda: orders.Introspect(pb.IntrospectRequest(token="a.b.c")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not svc.stub("billing").Introspect(pb.IntrospectRequest(token="a.b.c")).active


def test_lock_revokes_everything_and_refuses_issue_until_unlocked(mtls_service, redis_url):
    svc = mtls_service(POLICY)
    login, admin = svc.stub("login"), svc.stub("admin")
    pairs = [login.Issue(pb.IssueRequest(subject="alice")).tokens for _ in range(2)]
    assert admin.LockSubject(pb.LockSubjectRequest(subject="alice", reason="phished")) == (
        pb.LockSubjectResponse(revoked_sessions=2)
    )
    for pair in pairs:
        assert not admin.Introspect(pb.IntrospectRequest(token=pair.access_token)).active
        refresh = pb.RefreshRequest(refresh_token=pair.refresh_token)
        assert refused(lambda r=refresh: login.Refresh(r)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    err = refused(lambda: login.Issue(pb.IssueRequest(subject="alice")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "locked" in (err.details() or "")
    assert login.Issue(pb.IssueRequest(subject="bob")).tokens  # only alice
    # a lock never expires on its own
    assert redis.Redis.from_url(redis_url).pttl(subject_key(tag_of(pairs[0].session_id))) == -1

    assert admin.UnlockSubject(pb.UnlockSubjectRequest(subject="alice")).was_locked
    assert not admin.UnlockSubject(pb.UnlockSubjectRequest(subject="alice")).was_locked
    fresh = login.Issue(pb.IssueRequest(subject="alice")).tokens
    assert admin.Introspect(pb.IntrospectRequest(token=fresh.access_token)).active
    # sessions revoked by the lock stay revoked
    assert not admin.Introspect(pb.IntrospectRequest(token=pairs[0].access_token)).active


def test_lock_and_unlock_validate_input(mtls_service):
    admin = mtls_service(POLICY).stub("admin")
    for call in (
        lambda: admin.LockSubject(pb.LockSubjectRequest()),
        lambda: admin.UnlockSubject(pb.UnlockSubjectRequest(subject="x" * 1000)),
        lambda: admin.LockSubject(pb.LockSubjectRequest(subject="a", reason="r" * 600)),
    ):
        assert refused(call).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_oversized_metadata_and_messages_are_refused_by_the_transport(tokensvc):
    stub = tokensvc.stub()
    huge_header = (("x-junk", "a" * 40_000),)
    err = refused(lambda: stub.GetKeys(pb.GetKeysRequest(), metadata=huge_header))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    big = pb.IssueRequest(subject="alice", roles=["r" * 1000] * 100)  # ~100 kB
    err = refused(lambda: stub.Issue(big))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.GetKeys(pb.GetKeysRequest()).jwks  # the server is unharmed


def test_a_blocked_peer_keeps_issue_and_revoke_and_revoked_tokens_do_not_count(mtls_service):
    # a login service relays its users' refreshes: users' dead sessions must not cost it
    # its own Issue and Revoke, and only guessing-like failures count
    policy = POLICY + f'[rpc.Revoke]\nallow = ["{LOGIN}"]\n'
    login = mtls_service(
        policy, rate_auth_failures=Rate(3, 60), rate_auth_failures_relay=Rate(3, 60)
    ).stub("login")
    dead = login.Issue(pb.IssueRequest(subject="alice")).tokens
    login.Revoke(pb.RevokeRequest(session_id=dead.session_id))
    for _ in range(6):  # revoked: refused, audited, not counted
        err = refused(lambda: login.Refresh(pb.RefreshRequest(refresh_token=dead.refresh_token)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    bogus = pb.RefreshRequest(refresh_token="tsr1_" + "0" * 64 + "_" + "1" * 64)
    for _ in range(4):
        refused(lambda: login.Refresh(bogus))
    assert refused(lambda: login.Refresh(bogus)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fresh = login.Issue(pb.IssueRequest(subject="bob")).tokens  # still issuing
    assert login.Revoke(pb.RevokeRequest(session_id=fresh.session_id)).revoked_sessions == 1


def test_refused_issue_calls_cost_no_signature(mtls_service, monkeypatch):
    # checked first, signed after: a locked or rate-limited subject costs its caller
    # nothing but the one Redis round trip (the real signer, counted)
    from tokensvc.families import tokens

    signed: list[str] = []
    sign = tokens.sign_access_token

    def counting(key, kid, claims, *typ):
        signed.append(claims["sub"])
        return sign(key, kid, claims, *typ)

    monkeypatch.setattr(tokens, "sign_access_token", counting)
    svc = mtls_service(POLICY, rate_issue=Rate(2, 60))
    login, admin = svc.stub("login"), svc.stub("admin")
    for _ in range(2):
        login.Issue(pb.IssueRequest(subject="alice"))
    for _ in range(3):
        err = refused(lambda: login.Issue(pb.IssueRequest(subject="alice")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    admin.LockSubject(pb.LockSubjectRequest(subject="bob"))
    for _ in range(3):
        err = refused(lambda: login.Issue(pb.IssueRequest(subject="bob")))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert signed == ["alice", "alice"]
