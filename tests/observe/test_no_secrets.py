"""No token, refresh-token hash, key or KEK ever reaches a log line or the audit trail.

Real tokens and secrets go through every path that logs -- success, refusal, reuse,
revocation, forged tokens, Redis down, an unexpected internal error, the interceptor's
rejections -- with every logger at DEBUG; then the captured output and the audit stream
are searched for each secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from tests.support import audit_entries, events_of
from tokensvc.keys.ring import KeyRing, load_kek
from tokensvc.keys.ring_state import SECRET_NAMES
from tokensvc.observe.logs import JsonFormatter
from tokensvc.redis.embedded import RedisProcess
from tokensvc.store import family_key
from tokensvc_client._auth import Authenticator, step
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import KeySet, Verifier


def _secrets_of(pair: pb.TokenPair) -> list[str]:
    """The token, its signature, the refresh token, its random part and MAC, and the
    stored refresh hash."""
    return [
        pair.access_token,
        pair.access_token.split(".")[2],
        pair.refresh_token,
        pair.refresh_token.split("_")[-2],
        pair.refresh_token.rsplit("_", 1)[1],
        hashlib.sha256(pair.refresh_token.encode()).hexdigest(),
    ]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _key_secrets(settings) -> list[str]:
    kek = load_kek(settings.kek_file, settings.data_dir)

    async def private_d() -> str:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            ring = KeyRing(client, kek)
            await ring.load()
            deployment = [ring.secret(name) for name in SECRET_NAMES]
            return [str(ring.signing.key.export_private(as_dict=True)["d"])] + [
                form for key in deployment for form in (key.hex(), _b64url(key))
            ]
        finally:
            await client.aclose()

    return [str(kek.export(as_dict=True)["k"]), *asyncio.run(private_d())]


def _denied(call) -> None:
    """A refused Refresh: UNAUTHENTICATED, whatever the reason (it is not told)."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_no_secret_in_logs_or_audit(make_settings, start_server, redis_url, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    settings = make_settings(audit_log_all=True)  # every audit event logged too
    srv = start_server(settings)
    stub = srv.stub()
    secrets: list[str] = _key_secrets(settings)

    # success paths
    pair = stub.Issue(pb.IssueRequest(subject="alice", roles=["admin"])).tokens
    secrets += _secrets_of(pair)
    rotated = stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)).tokens
    secrets += _secrets_of(rotated)
    assert stub.Introspect(pb.IntrospectRequest(token=rotated.access_token)).active
    assert stub.Introspect(pb.IntrospectRequest(token=rotated.refresh_token)).active
    # refusals: reuse (revokes the family), garbage, forged, revoked
    _denied(lambda: stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)))
    forged = rotated.access_token[:-4] + "AAAA"
    secrets.append(forged)
    assert not stub.Introspect(pb.IntrospectRequest(token=forged)).active
    _denied(lambda: stub.Refresh(pb.RefreshRequest(refresh_token=rotated.access_token)))
    other = stub.Issue(pb.IssueRequest(subject="bob")).tokens
    secrets += _secrets_of(other)
    stub.Revoke(pb.RevokeRequest(token=other.access_token, reason="test"))
    assert not stub.Introspect(pb.IntrospectRequest(token=other.access_token)).active
    stub.Revoke(pb.RevokeRequest(token=other.refresh_token))
    _denied(lambda: stub.Refresh(pb.RefreshRequest(refresh_token=other.refresh_token)))
    stub.Revoke(pb.RevokeRequest(subject="alice"))

    # a grace-window replay: the same successor again
    graceful = start_server(make_settings(refresh_grace_seconds=5)).stub()
    g1 = graceful.Issue(pb.IssueRequest(subject="erin")).tokens
    g2 = graceful.Refresh(pb.RefreshRequest(refresh_token=g1.refresh_token)).tokens
    g3 = graceful.Refresh(pb.RefreshRequest(refresh_token=g1.refresh_token)).tokens
    assert g3.refresh_token == g2.refresh_token
    secrets += _secrets_of(g1) + _secrets_of(g2) + _secrets_of(g3)

    # an unexpected internal error: a family whose stored claims are corrupt
    third = stub.Issue(pb.IssueRequest(subject="carol")).tokens
    secrets += _secrets_of(third)
    raw = redis.Redis.from_url(redis_url)
    raw.hset(family_key(third.session_id), "claims", "{corrupt")
    with pytest.raises(grpc.RpcError) as internal:
        stub.Introspect(pb.IntrospectRequest(token=third.refresh_token))
    assert internal.value.code() == grpc.StatusCode.INTERNAL
    assert "correlation id" in (internal.value.details() or "")

    # the interceptor's decisions: valid, forged, and wrong audience
    keys = KeySet.from_jwks(stub.GetKeys(pb.GetKeysRequest()).jwks)
    auth = Authenticator(Verifier("https://tokensvc.test", "mesh"))
    for token in (third.access_token, forged, "Bearer-less " + third.access_token):
        decision = auth.decide("/svc/M", (("authorization", f"Bearer {token}"),))
        step(decision, None)
        step(decision, keys)

    # Redis unreachable: a private Redis that goes away mid-session
    private = RedisProcess(tmp_path / "r2", prefer_system=True).start()
    down = start_server(make_settings(redis_url=private.url))
    down_stub = down.stub()
    fourth = down_stub.Issue(pb.IssueRequest(subject="dave")).tokens
    secrets += _secrets_of(fourth)
    private.stop()
    for call in (
        lambda: down_stub.Refresh(pb.RefreshRequest(refresh_token=fourth.refresh_token)),
        lambda: down_stub.Introspect(pb.IntrospectRequest(token=fourth.access_token)),
        lambda: down_stub.Revoke(pb.RevokeRequest(token=fourth.refresh_token)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    # let the audit trail flush, then search everything
    wanted = {"revoked", "reuse_detected", "refresh_replayed"}
    audit = json.dumps(audit_entries(redis_url, lambda e: wanted <= set(events_of(e)), str(wanted)))
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert "correlation_id" in logged and "reuse" in logged  # the paths did log
    # KEK, private key, 2 deployment secrets in 2 spellings, 6 per pair (8 pairs), a forgery
    assert len(secrets) == 55
    for secret in secrets:
        assert secret not in logged, f"secret in logs: {secret[:12]}..."
        assert secret not in audit, f"secret in audit trail: {secret[:12]}..."
