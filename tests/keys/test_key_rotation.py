"""Key rotation without downtime: the schedule, manual and emergency rotation, retiring,
KEK rotation. Real Redis, real gRPC; short lifetimes so a whole cycle takes seconds."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from jwcrypto import jwk

from tests.support import wait_until
from tokensvc.cli.main import main as cli_main
from tokensvc.keys.ring import KeyRing, _jwe_kid, load_kek
from tokensvc.keys.ring_state import RING_KEY
from tokensvc_client.v1 import tokensvc_pb2 as pb

# a key is published 1 s before it signs, rotates every 4 s, outlives its tokens by 1 s
FAST = {"access_ttl": 1, "jwks_max_age": 1, "leeway": 0, "key_rotation_interval": 4}


def _kid(token: str) -> str:
    from tokensvc_client.verifier import b64url_decode

    return str(json.loads(b64url_decode(token.split(".")[0]))["kid"])


def _published(stub) -> set[str]:
    return {k["kid"] for k in json.loads(stub.GetKeys(pb.GetKeysRequest()).jwks)["keys"]}


def test_scheduled_rotation_publishes_first_and_runs_once_across_replicas(
    make_settings, start_server
):
    settings = make_settings(**FAST)
    replicas = [start_server(settings), start_server(settings)]
    stubs = [r.stub() for r in replicas]
    first = stubs[0].ListKeys(pb.ListKeysRequest()).keys
    assert [(k.state) for k in first] == ["active"]
    seen_kids: set[str] = {first[0].kid}
    published_at: dict[str, float] = {}
    signing_seen: dict[str, float] = {}
    issued = 0

    def step() -> bool:
        """Issue on both replicas, note when each key is published and first signs."""
        nonlocal issued, seen_kids
        now = time.monotonic()
        for stub in stubs:
            for kid in _published(stub):
                published_at.setdefault(kid, now)
            issued += 1
            subject = f"user{issued}"  # (one subject would hit its Issue rate limit)
            kid = _kid(stub.Issue(pb.IssueRequest(subject=subject)).tokens.access_token)
            signing_seen.setdefault(kid, now)
        ring = stubs[0].ListKeys(pb.ListKeysRequest()).keys
        states = [k.state for k in ring]
        assert states.count("active") == 1, states
        assert states.count("pending") <= 1, states
        seen_kids |= {k.kid for k in ring}
        # done when the first key has been retired and deleted
        return first[0].kid not in {k.kid for k in ring} and len(signing_seen) >= 2

    wait_until(step, 12, what="the first key retired and deleted", interval=0.1)
    assert first[0].kid not in _published(stubs[0]), "retired key never deleted"
    new_kids = seen_kids - {first[0].kid}
    assert len(new_kids) in (1, 2), seen_kids  # one per rotation, never a duplicate
    for kid, first_signed in signing_seen.items():
        if kid != first[0].kid:
            # every verifier could fetch the key before a token carried it
            assert published_at[kid] < first_signed


def test_manual_rotation_publishes_then_promotes(make_settings, start_server):
    stub = start_server(make_settings(**{**FAST, "key_rotation_interval": 3600})).stub()
    old = stub.ListKeys(pb.ListKeysRequest()).keys[0].kid
    ring = stub.RotateKeys(pb.RotateKeysRequest()).keys
    pending = [k for k in ring if k.state == "pending"]
    assert len(pending) == 1 and pending[0].HasField("activate_after")
    assert pending[0].kid in _published(stub)
    assert _kid(stub.Issue(pb.IssueRequest(subject="a")).tokens.access_token) == old
    subjects = iter(range(10**6))  # (one subject would hit its Issue rate limit)
    wait_until(
        lambda: (
            _kid(stub.Issue(pb.IssueRequest(subject=f"u{next(subjects)}")).tokens.access_token)
            != old
        ),
        10,
        what="the pending key promoted",
        interval=0.1,
    )
    states = {k.kid: k.state for k in stub.ListKeys(pb.ListKeysRequest()).keys}
    assert states == {old: "retired", pending[0].kid: "active"}


def test_emergency_rotation_drops_the_old_key_everywhere_at_once(make_settings, start_server):
    settings = make_settings(key_rotation_interval=3600)
    a, b = start_server(settings), start_server(settings)
    stub_a, stub_b = a.stub(), b.stub()
    before = stub_a.Issue(pb.IssueRequest(subject="alice")).tokens.access_token
    ring = stub_a.RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True)).keys
    assert [k.state for k in ring] == ["active"] and ring[0].kid != _kid(before)
    assert _published(stub_a) == {ring[0].kid}
    assert not stub_a.Introspect(pb.IntrospectRequest(token=before)).active
    # the other replica follows within its next tick (1 s)
    wait_until(
        lambda: (
            _published(stub_b) == {ring[0].kid}
            and not stub_b.Introspect(pb.IntrospectRequest(token=before)).active
        ),
        5,
        what="the other replica to drop the old key",
    )
    after = stub_b.Issue(pb.IssueRequest(subject="alice")).tokens.access_token
    assert _kid(after) == ring[0].kid
    assert stub_a.Introspect(pb.IntrospectRequest(token=after)).active


def test_retire_and_bad_rotation_requests(make_settings, start_server):
    stub = start_server(make_settings(key_rotation_interval=3600)).stub()
    active = stub.ListKeys(pb.ListKeysRequest()).keys[0].kid
    pending = [k for k in stub.RotateKeys(pb.RotateKeysRequest()).keys if k.state == "pending"]
    ring = stub.RetireKey(pb.RetireKeyRequest(kid=pending[0].kid)).keys
    assert [k.kid for k in ring] == [active]
    assert pending[0].kid not in _published(stub)
    for call in (
        lambda: stub.RetireKey(pb.RetireKeyRequest(kid=active)),
        lambda: stub.RetireKey(pb.RetireKeyRequest(kid="nope")),
        lambda: stub.RetireKey(pb.RetireKeyRequest()),
        lambda: stub.RotateKeys(pb.RotateKeysRequest(revoke_old=True)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_key_admin_rpcs_need_an_admin_identity(mtls_service):
    orders = mtls_service("").stub("orders")
    for call in (
        lambda: orders.ListKeys(pb.ListKeysRequest()),
        lambda: orders.RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True)),
        lambda: orders.RetireKey(pb.RetireKeyRequest(kid="x")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_kek_rotation_rewraps_every_key(make_settings, start_server, redis_url, tmp_path):
    old_kek, new_kek = tmp_path / "old.json", tmp_path / "new.json"
    old_kek.write_text(jwk.JWK.generate(kty="oct", size=256).export())
    new_kek.write_text(jwk.JWK.generate(kty="oct", size=256).export())
    first = start_server(make_settings(kek_file=old_kek, key_rotation_interval=3600))
    first.stub().RotateKeys(pb.RotateKeysRequest())  # two records to re-wrap
    token = first.stub().Issue(pb.IssueRequest(subject="a")).tokens.access_token
    first.stop()

    # replicas get the new KEK with the old one as previous, then the ring is re-wrapped
    both = start_server(
        make_settings(kek_file=new_kek, previous_kek_file=old_kek, key_rotation_interval=3600)
    )
    assert both.stub().Introspect(pb.IntrospectRequest(token=token)).active
    code = cli_main(
        [
            "keys",
            "rewrap",
            "--redis-url",
            redis_url,
            "--kek-file",
            str(new_kek),
            "--previous-kek-file",
            str(old_kek),
        ]
    )
    assert code == 0
    new_id = load_kek(new_kek, tmp_path).thumbprint()
    records = [json.loads(v) for v in redis.Redis.from_url(redis_url).hgetall(RING_KEY).values()]
    assert len(records) == 2 and all(_jwe_kid(r["private"]) == new_id for r in records)
    both.stop()

    # now the old KEK can go
    only_new = start_server(make_settings(kek_file=new_kek, key_rotation_interval=3600))
    assert only_new.stub().Issue(pb.IssueRequest(subject="a")).tokens.access_token

    async def old_kek_is_useless() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            ring = KeyRing(client, load_kek(old_kek, tmp_path))
            with pytest.raises(Exception, match="wrong key-encryption key"):
                await ring.load()
        finally:
            await client.aclose()

    asyncio.run(old_kek_is_useless())
