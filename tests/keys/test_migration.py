"""Moving a running deployment from the local backend to the pkcs11 one through an
ordinary rotation: the ring the previous version wrote keeps working, the new key is
generated in the token and published before it signs, and tokens of both keys verify."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import redis
from jwcrypto import jwe, jwk

from tests.keys.conftest import UNLIMITED, kid_of
from tests.support import wait_until
from tokensvc.keys.ring import KeyRingError
from tokensvc.keys.ring_state import ACTIVE_KEY, RING_KEY, VERSION_KEY
from tokensvc_client.v1 import tokensvc_pb2 as pb

# published 1 s before it signs; a retired key stays published for its tokens' 60 s
SLOW_EXPIRY = {"access_ttl": 60, "jwks_max_age": 1, "leeway": 0, "key_rotation_interval": 3600}


def _old_version_ring(redis_url: str, kek: jwk.JWK) -> str:
    """The key ring exactly as the version before backends wrote it: one active key whose
    record has the private JWK as a JWE under the KEK and no ``backend`` field."""
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    kid = key.thumbprint()
    public = json.loads(key.export_public())
    public.update({"kid": kid, "use": "sig", "alg": "ES256"})
    wrapped = jwe.JWE(
        key.export_private().encode("utf-8"),
        protected={"alg": "A256KW", "enc": "A256GCM", "kid": kek.thumbprint(), "cty": "jwk+json"},
    )
    wrapped.add_recipient(kek)
    now_ms = int(time.time() * 1000)
    record = {
        "kid": kid,
        "state": "active",
        "public": public,
        "private": wrapped.serialize(compact=True),
        "created_ms": now_ms,
        "activated_ms": now_ms,
    }
    client = redis.Redis.from_url(redis_url)
    client.hset(RING_KEY, kid, json.dumps(record))
    client.set(ACTIVE_KEY, kid)
    client.set(VERSION_KEY, 1)
    client.close()
    return kid


def _verify_all(stub, tokens: list[str], issuer: str) -> None:
    keys = {k["kid"]: k for k in json.loads(stub.GetKeys(pb.GetKeysRequest()).jwks)["keys"]}
    for token in tokens:
        assert stub.Introspect(pb.IntrospectRequest(token=token)).active
        key = jwt.PyJWK(keys[kid_of(token)]).key
        assert jwt.decode(token, key, algorithms=["ES256"], audience="mesh", issuer=issuer)


def test_local_to_pkcs11_by_rotation_with_tokens_of_both_verifying(
    make_settings, start_server, softhsm, redis_url, tmp_path
):
    kek_file = tmp_path / "kek.json"
    kek = jwk.JWK.generate(kty="oct", size=256)
    kek_file.write_text(kek.export())
    kek_file.chmod(0o600)
    old = _old_version_ring(redis_url, kek)
    common = {**SLOW_EXPIRY, **UNLIMITED, "kek_file": kek_file}
    # step 1: every replica gets the token, new keys still local; step 2: new keys in it
    local = start_server(make_settings(**softhsm.settings(**common)))
    moved = start_server(make_settings(**softhsm.settings(key_backend="pkcs11", **common)))
    a, b = local.stub(), moved.stub()
    before = a.Issue(pb.IssueRequest(subject="migrating")).tokens.access_token
    assert (
        kid_of(before) == old == kid_of(b.Issue(pb.IssueRequest(subject="m")).tokens.access_token)
    )

    ring = b.RotateKeys(pb.RotateKeysRequest()).keys  # the ordinary, planned rotation
    (new,) = [k.kid for k in ring if k.state == "pending"]
    client = redis.Redis.from_url(redis_url)
    assert json.loads(client.hget(RING_KEY, new))["backend"] == "pkcs11"

    def signs_new(stub) -> str | None:
        token = stub.Issue(pb.IssueRequest(subject="migrating")).tokens.access_token
        return token if kid_of(token) == new else None

    after_a = wait_until(lambda: signs_new(a), what="replica a to sign with the pkcs11 key")
    after_b = wait_until(lambda: signs_new(b), what="replica b to sign with the pkcs11 key")
    states = {k.kid: k.state for k in a.ListKeys(pb.ListKeysRequest()).keys}
    assert states == {old: "retired", new: "active"}  # the local key stays published
    for stub in (a, b):
        _verify_all(stub, [before, after_a, after_b], local.settings.issuer)
    # the old local record is as the previous version wrote it (plus its retirement)
    record = json.loads(client.hget(RING_KEY, old))
    assert "backend" not in record and record["private"].count(".") == 4
    client.close()


def test_a_replica_without_the_token_refuses_to_start_on_a_pkcs11_key(
    make_settings, start_server, softhsm
):
    start_server(make_settings(**softhsm.settings(key_backend="pkcs11")))
    with pytest.raises(KeyRingError, match=r"held in a PKCS#11 token .*--pkcs11-module"):
        start_server(make_settings())
