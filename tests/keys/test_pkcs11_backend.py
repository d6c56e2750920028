"""The pkcs11 key backend on a real SoftHSM2 token: keys generated in the token and never
out of it, tokens that verify anywhere, rotation (planned and emergency) that destroys the
objects of deleted keys, replicas that share one token."""

from __future__ import annotations

import json

import jwt
import redis

from tests.keys.conftest import UNLIMITED, kid_of, token_objects
from tests.support import wait_until
from tokensvc.keys.ring_state import ACTIVE_KEY, DESTROY_KEY, RING_KEY
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import KeySet, Verifier

# a key is published 1 s before it signs, rotates every 4 s, outlives its tokens by 1 s
FAST = {"access_ttl": 1, "jwks_max_age": 1, "leeway": 0, "key_rotation_interval": 4}


def test_issued_token_verifies_with_the_client_verifier_and_pyjwt(
    hsm_settings, start_server, softhsm
):
    settings = hsm_settings()
    srv = start_server(settings)
    stub = srv.stub()
    pair = stub.Issue(pb.IssueRequest(subject="alice", roles=["reader"])).tokens
    kid = kid_of(pair.access_token)
    jwks = stub.GetKeys(pb.GetKeysRequest()).jwks
    # the verifier every interceptor of the client library uses
    claims = Verifier(settings.issuer, "mesh").verify(pair.access_token, KeySet.from_jwks(jwks))
    assert claims.subject == "alice"
    # an independent JOSE library against the published JWK Set
    (public,) = [k for k in json.loads(jwks)["keys"] if k["kid"] == kid]
    key = jwt.PyJWK(public).key
    decoded = jwt.decode(
        pair.access_token, key, algorithms=["ES256"], audience="mesh", issuer=settings.issuer
    )
    assert decoded["sub"] == "alice" and decoded["roles"] == ["reader"]
    assert stub.Introspect(pb.IntrospectRequest(token=pair.access_token)).active
    # Refresh signs in the token too
    again = stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)).tokens
    assert kid_of(again.access_token) == kid


def test_the_private_key_never_leaves_the_token(hsm_settings, start_server, softhsm, caplog):
    settings = hsm_settings()
    stub = start_server(settings).stub()
    kid = kid_of(stub.Issue(pb.IssueRequest(subject="bob")).tokens.access_token)
    client = redis.Redis.from_url(settings.redis_url)
    record = json.loads(client.hget(RING_KEY, kid))
    client.close()
    assert record["backend"] == "pkcs11"
    assert "private" not in record and "d" not in record["public"]
    assert record["ref"].startswith(f"pkcs11:token={softhsm.label};id={kid};")
    facts = token_objects(softhsm, kid)
    assert facts == {
        "count": 2,  # the private and the public key
        "SENSITIVE": True,
        "EXTRACTABLE": False,
        "ALWAYS_SENSITIVE": True,
        "NEVER_EXTRACTABLE": True,
        "value_readable": False,
    }
    pin = softhsm.pin_file.read_text().strip()
    assert pin not in caplog.text


def test_emergency_rotation_destroys_the_revoked_key_in_the_token(
    hsm_settings, start_server, softhsm
):
    settings = hsm_settings(key_rotation_interval=3600)
    stub = start_server(settings).stub()
    old = kid_of(stub.Issue(pb.IssueRequest(subject="carol")).tokens.access_token)
    ring = stub.RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True)).keys
    (new,) = [k.kid for k in ring if k.state == "active"]
    assert new != old
    assert kid_of(stub.Issue(pb.IssueRequest(subject="carol")).tokens.access_token) == new
    wait_until(lambda: token_objects(softhsm, old)["count"] == 0, what="revoked key destroyed")
    assert token_objects(softhsm, new)["count"] == 2
    client = redis.Redis.from_url(settings.redis_url)
    wait_until(lambda: client.hlen(DESTROY_KEY) == 0, what="destroy list drained")
    client.close()


def test_planned_rotation_publishes_promotes_and_destroys_after_the_last_token(
    hsm_settings, start_server, softhsm
):
    settings = hsm_settings(**{**FAST, **UNLIMITED, "key_rotation_interval": 3600})
    stub = start_server(settings).stub()
    old = kid_of(stub.Issue(pb.IssueRequest(subject="dave")).tokens.access_token)
    ring = stub.RotateKeys(pb.RotateKeysRequest()).keys
    (pending,) = [k.kid for k in ring if k.state == "pending"]
    assert token_objects(softhsm, pending)["count"] == 2  # generated in the token
    wait_until(
        lambda: kid_of(stub.Issue(pb.IssueRequest(subject="dave")).tokens.access_token) == pending,
        what="the pending key to sign",
    )
    # retired, then deleted once its last token expired: its objects go with it
    wait_until(lambda: token_objects(softhsm, old)["count"] == 0, what="retired key destroyed")
    published = {k["kid"] for k in json.loads(stub.GetKeys(pb.GetKeysRequest()).jwks)["keys"]}
    assert old not in published and pending in published


def test_two_replicas_share_one_token(hsm_settings, start_server, softhsm):
    settings = hsm_settings(key_rotation_interval=3600, **UNLIMITED)
    first, second = start_server(settings), start_server(settings)
    a, b = first.stub(), second.stub()
    assert kid_of(a.Issue(pb.IssueRequest(subject="erin")).tokens.access_token) == kid_of(
        b.Issue(pb.IssueRequest(subject="erin")).tokens.access_token
    )
    ring = a.RotateKeys(pb.RotateKeysRequest(now=True)).keys
    (new,) = [k.kid for k in ring if k.state == "active"]

    # the other replica picks the new key up from Redis and finds its object in the token
    def signed_by_new() -> str | None:
        token = b.Issue(pb.IssueRequest(subject="erin")).tokens.access_token
        return token if kid_of(token) == new else None

    token = wait_until(signed_by_new, what="replica b to sign with the new key")
    assert a.Introspect(pb.IntrospectRequest(token=token)).active
    client = redis.Redis.from_url(settings.redis_url)
    assert client.get(ACTIVE_KEY).decode() == new
    client.close()
