"""The key ring: encrypted at rest, shared by replicas, wrong KEK fails at start."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import redis
import redis.asyncio as aioredis
from jwcrypto import jwk

from tokensvc.keys.ring import KeyRing, KeyRingError, load_kek
from tokensvc.keys.ring_state import ACTIVE_KEY, RING_KEY
from tokensvc_client.v1 import tokensvc_pb2 as pb


def test_private_key_is_stored_only_as_jwe(stub, redis_url):
    client = redis.Redis.from_url(redis_url)
    records = [json.loads(v) for v in client.hgetall(RING_KEY).values()]
    assert len(records) == 1
    record = records[0]
    assert record["state"] == "active" and client.get(ACTIVE_KEY).decode() == record["kid"]
    assert "d" not in record["public"]
    assert record["private"].count(".") == 4  # compact JWE
    header = json.loads(jwk.base64url_decode(record["private"].split(".")[0]))
    assert header["alg"] == "A256KW" and header["enc"] == "A256GCM"
    assert '"d"' not in json.dumps(record).replace(record["private"], "")


def test_two_replicas_on_one_redis_share_one_key_ring(make_settings, start_server):
    settings = make_settings()
    first, second = start_server(settings), start_server(settings)
    keys_a = first.stub().GetKeys(pb.GetKeysRequest()).jwks
    keys_b = second.stub().GetKeys(pb.GetKeysRequest()).jwks
    assert keys_a == keys_b
    pair = first.stub().Issue(pb.IssueRequest(subject="alice")).tokens
    assert second.stub().Introspect(pb.IntrospectRequest(token=pair.access_token)).active


def test_concurrent_bootstrap_creates_exactly_one_key(redis_url, tmp_path):
    kek = load_kek(None, tmp_path)

    async def race() -> set[str]:
        clients = [aioredis.Redis.from_url(redis_url) for _ in range(8)]
        rings = [KeyRing(c, kek) for c in clients]
        await asyncio.gather(*(r.load() for r in rings))
        kids = {r.signing.kid for r in rings}
        for c in clients:
            await c.aclose()
        return kids

    assert len(asyncio.run(race())) == 1
    assert redis.Redis.from_url(redis_url).hlen(RING_KEY) == 1


def test_wrong_kek_fails_at_start_with_a_clear_error(make_settings, start_server, tmp_path):
    start_server(make_settings())  # creates the ring under the dev KEK
    other = tmp_path / "other-kek.json"
    other.write_text(jwk.JWK.generate(kty="oct", size=256).export())
    with pytest.raises(KeyRingError, match="wrong key-encryption key"):
        start_server(make_settings(kek_file=other))


def test_serve_with_a_kek_that_cannot_decrypt_redis_is_one_line_exit_2(
    make_settings, start_server, redis_url, tmp_path
):
    """What an operator sees: the flags to check, no traceback (a process, as deployed)."""
    start_server(make_settings())  # the ring and secrets, under the dev KEK
    other = tmp_path / "other-kek.json"
    other.write_text(jwk.JWK.generate(kty="oct", size=256).export())
    other.chmod(0o600)
    argv = ["serve", "--insecure", "--listen", "127.0.0.1:0", "--redis-url", redis_url]
    argv += ["--data-dir", str(tmp_path / "data"), "--kek-file", str(other)]
    done = subprocess.run(
        [sys.executable, "-m", "tokensvc", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("tokensvc: cannot start: cannot decrypt ")
    assert "--kek-file" in line and "--previous-kek-file" in line


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        jwk.JWK.generate(kty="oct", size=128).export(),
        jwk.JWK.generate(kty="EC", crv="P-256").export(),
    ],
    ids=["not-json", "128-bit-key", "ec-key"],  # stable ids: xdist workers collect alike
)
def test_unusable_kek_file_is_refused(tmp_path, content):
    path = tmp_path / "kek.json"
    path.write_text(content)
    with pytest.raises(KeyRingError, match="256-bit oct JWK"):
        load_kek(path, tmp_path)


def test_development_kek_is_created_private(tmp_path):
    load_kek(None, tmp_path)
    assert (tmp_path / "dev-kek.json").stat().st_mode & 0o077 == 0
