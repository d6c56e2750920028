"""Revocation by access token, refresh token, session and subject (docs/design.md, Revocation)."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import redis

from tokensvc.store import jti_key
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import b64url_decode


def _active(stub, token) -> bool:
    return stub.Introspect(pb.IntrospectRequest(token=token)).active


def _issue(stub, subject="alice"):
    return stub.Issue(pb.IssueRequest(subject=subject)).tokens


def test_revoke_access_token_revokes_its_jti_until_it_expires(stub, redis_url):
    pair = _issue(stub)
    sibling = stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)).tokens
    assert stub.Revoke(pb.RevokeRequest(token=pair.access_token)).revoked_sessions == 0
    assert not _active(stub, pair.access_token)
    assert _active(stub, sibling.access_token) and _active(stub, sibling.refresh_token)
    claims = json.loads(b64url_decode(pair.access_token.split(".")[1]))
    ttl = redis.Redis.from_url(redis_url).ttl(jti_key(claims["sid"], claims["jti"]))
    assert 0 < ttl <= claims["exp"] - int(time.time()) + 1


def test_revoke_refresh_token_revokes_its_family(stub):
    pair = _issue(stub)
    assert stub.Revoke(pb.RevokeRequest(token=pair.refresh_token)).revoked_sessions == 1
    assert not _active(stub, pair.access_token) and not _active(stub, pair.refresh_token)
    with pytest.raises(grpc.RpcError) as err:
        stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoke_with_a_forged_refresh_token_revokes_nothing(stub):
    pair = _issue(stub)
    forged = f"tsr1_{pair.session_id}_{'f' * 64}"
    assert stub.Revoke(pb.RevokeRequest(token=forged)).revoked_sessions == 0
    assert _active(stub, pair.access_token)


def test_revoke_invalid_token_is_not_an_error(stub):
    assert stub.Revoke(pb.RevokeRequest(token="a.b.c")).revoked_sessions == 0


def test_revoke_session(stub):
    pair, other = _issue(stub), _issue(stub)
    assert (
        stub.Revoke(
            pb.RevokeRequest(session_id=pair.session_id, reason="lost device")
        ).revoked_sessions
        == 1
    )
    assert stub.Revoke(pb.RevokeRequest(session_id=pair.session_id)).revoked_sessions == 0
    assert not _active(stub, pair.access_token) and not _active(stub, pair.refresh_token)
    assert _active(stub, other.access_token)


def test_revoke_subject_logs_out_everywhere_and_only_that_subject(stub):
    sessions = [_issue(stub, "alice") for _ in range(3)]
    bob = _issue(stub, "bob")
    assert (
        stub.Revoke(pb.RevokeRequest(subject="alice", reason="compromised")).revoked_sessions == 3
    )
    for pair in sessions:
        assert not _active(stub, pair.access_token) and not _active(stub, pair.refresh_token)
        with pytest.raises(grpc.RpcError) as err:
            stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _active(stub, bob.access_token) and _active(stub, bob.refresh_token)
    # a new login after the revocation works
    time.sleep(0.01)  # a later millisecond than the watermark (nothing else marks it)
    fresh = _issue(stub, "alice")
    assert _active(stub, fresh.access_token)
    fresh2 = stub.Refresh(pb.RefreshRequest(refresh_token=fresh.refresh_token)).tokens
    assert _active(stub, fresh2.access_token)


def test_subject_watermark_covers_families_missing_from_the_index(stub, redis_url):
    """A family whose index entry is gone (e.g. written by a crashed replica) is still
    revoked by the subject watermark: it is O(1) and does not rely on the index."""
    pair = _issue(stub, "carol")
    client = redis.Redis.from_url(redis_url)
    for key in client.keys("ts:{*}:sessions"):
        client.delete(key)
    stub.Revoke(pb.RevokeRequest(subject="carol"))
    assert not _active(stub, pair.access_token)
    with pytest.raises(grpc.RpcError) as err:
        stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
