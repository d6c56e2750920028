"""The verifier's cache of verified tokens: bounded, exact-match, honours exp and keys."""

from __future__ import annotations

import pytest
from jwcrypto import jwk

from tokensvc.families.tokens import sign_access_token
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.verifier import KeySet, Verifier

NOW = 1_800_000_000


def _token(key: jwk.JWK, kid: str, **claims: object) -> str:
    base = {
        "iss": "iss",
        "sub": "alice",
        "aud": ["mesh"],
        "exp": NOW + 60,
        "iat": NOW,
        "nbf": NOW,
        "jti": "j",
        "sid": "s",
        "client_id": "",
        "roles": [],
    }
    return sign_access_token(key, kid, {**base, **claims})


@pytest.fixture
def key() -> jwk.JWK:
    return jwk.JWK.generate(kty="EC", crv="P-256")


def _keys(key: jwk.JWK, kid: str = "k1") -> KeySet:
    public = jwk.JWK.from_json(key.export_public())
    public.update({"kid": kid})  # type: ignore[attr-defined]
    return KeySet.of([public])


def test_repeated_token_is_served_from_the_cache_until_it_expires(key):
    now = [float(NOW)]
    verifier = Verifier("iss", "mesh", clock=lambda: now[0])
    keys, token = _keys(key), _token(key, "k1")
    first = verifier.verify(token, keys)
    assert verifier.verify(token, keys) is first  # cache hit: the same object
    now[0] = NOW + 60
    with pytest.raises(InvalidToken) as err:
        verifier.verify(token, keys)
    assert err.value.reason is Reason.EXPIRED


def test_cached_token_is_rejected_once_its_key_is_gone(key):
    verifier = Verifier("iss", "mesh", clock=lambda: NOW)
    token = _token(key, "k1")
    verifier.verify(token, _keys(key))
    other = jwk.JWK.generate(kty="EC", crv="P-256")
    with pytest.raises(InvalidToken) as err:
        verifier.verify(token, _keys(other, "k2"))
    assert err.value.reason is Reason.UNKNOWN_KEY


def test_a_tampered_copy_never_hits_the_entry_of_the_original(key):
    verifier = Verifier("iss", "mesh", clock=lambda: NOW)
    keys, token = _keys(key), _token(key, "k1")
    verifier.verify(token, keys)
    header, _payload, sig = token.split(".")
    forged = f"{header}.{_token(key, 'k1', sub='mallory').split('.')[1]}.{sig}"
    with pytest.raises(InvalidToken) as err:
        verifier.verify(forged, keys)
    assert err.value.reason is Reason.BAD_SIGNATURE


def test_cache_is_bounded(key):
    verifier = Verifier("iss", "mesh", clock=lambda: NOW, cache_size=8)
    keys = _keys(key)
    for i in range(50):
        verifier.verify(_token(key, "k1", jti=f"j{i}"), keys)
    assert len(verifier._cache) == 8


def test_wrong_audience_is_never_cached_as_valid(key):
    verifier = Verifier("iss", "mesh", clock=lambda: NOW)
    token = _token(key, "k1", aud=["billing"])
    for _ in range(2):
        with pytest.raises(InvalidToken):
            verifier.verify(token, _keys(key))
    assert not verifier._cache
