"""The verifier's Transaction Token rules (draft-ietf-oauth-transaction-tokens-10) and the
actor chain of access tokens: unit cases on hand-signed tokens with an injected clock."""

from __future__ import annotations

import json

import pytest

from tests.attacks.forge import DROP, EcKey, apply_changes
from tokensvc_client._auth import Authenticator
from tokensvc_client._chains import TransactionTokens
from tokensvc_client._rejection import Rejection
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.verifier import (
    MAX_ACT_NESTING,
    KeySet,
    TransactionVerifier,
    Verifier,
    actor_chain,
)

NOW = 1_800_000_000
ISSUER = "https://tokensvc.test"
DOMAIN = "tokensvc.test"
KEY = EcKey.generate("k1")
KEYS = KeySet.from_jwks(json.dumps({"keys": [KEY.public_jwk]}))


def _txn_claims(**changes):
    base = {
        "iss": ISSUER,
        "iat": NOW,
        "exp": NOW + 60,
        "aud": DOMAIN,
        "txn": "97053963-771d-49cc-a4e3-20aad399c312",
        "sub": "alice",
        "scope": "orders:read billing:read",
        "req_wl": "spiffe://tokensvc.test/ns/edge/sa/gateway",
        "tctx": {"order": 42},
        "rctx": {"req_ip": "203.0.113.7"},
        "sid": "s" * 43,
        "jti": "j1",
    }
    return apply_changes(base, changes)


def _access_claims(**changes):
    base = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": ["orders"],
        "roles": [],
        "exp": NOW + 60,
        "iat": NOW,
        "nbf": NOW,
        "jti": "j2",
        "sid": "s" * 43,
    }
    return apply_changes(base, changes)


def _sign(claims, typ="txntoken+jwt"):
    return KEY.sign({"alg": "ES256", "typ": typ, "kid": KEY.kid}, claims)


def _txn_verifier(now=NOW):
    return TransactionVerifier(DOMAIN, issuer=ISSUER, clock=lambda: now, cache_size=0)


def _access_verifier():
    return Verifier(ISSUER, "orders", clock=lambda: NOW, cache_size=0)


def _reason(call) -> Reason:
    with pytest.raises(InvalidToken) as err:
        call()
    return err.value.reason


def test_a_transaction_token_and_its_claims():
    claims = _txn_verifier().verify(_sign(_txn_claims()), KEYS)
    assert claims.trust_domain == DOMAIN and claims.subject == "alice"
    assert claims.scope == ("orders:read", "billing:read")
    assert claims.requesting_workload.endswith("/gateway")
    assert claims.workload_chain == (claims.requesting_workload,)
    assert claims.context == {"order": 42} and claims.request_context["req_ip"]
    revocation = claims.for_revocation()
    assert revocation.session_id == "s" * 43 and revocation.token_id == "j1"
    assert revocation.key_id == KEY.kid and revocation.issued_at == NOW


def test_the_two_kinds_never_stand_in_for_each_other():
    """Even after each verifier has seen (and cached) its own kind's header."""
    txn, access = _sign(_txn_claims()), _sign(_access_claims(), typ="at+jwt")
    assert _txn_verifier().verify(txn, KEYS)
    assert _access_verifier().verify(access, KEYS)
    assert _reason(lambda: _access_verifier().verify(txn, KEYS)) is Reason.BAD_TYPE
    assert _reason(lambda: _txn_verifier().verify(access, KEYS)) is Reason.BAD_TYPE
    # application/ media type spellings are each kind's own
    also = _sign(_txn_claims(), typ="application/txntoken+jwt")
    assert _txn_verifier().verify(also, KEYS)
    assert _reason(lambda: _access_verifier().verify(also, KEYS)) is Reason.BAD_TYPE


@pytest.mark.parametrize("claim", ["iat", "aud", "exp", "txn", "sub", "scope", "req_wl"])
def test_every_claim_the_draft_requires(claim):
    token = _sign(_txn_claims(**{claim: DROP}))
    assert _reason(lambda: _txn_verifier().verify(token, KEYS)) is Reason.BAD_CLAIMS


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": [DOMAIN, "other"]},
        {"aud": ""},
        {"scope": ""},
        {"scope": ["orders:read"]},
        {"tctx": "BUY"},
        {"rctx": ["x"]},
        {"req_wl_chain": ["spiffe://x/a", "spiffe://x/b"]},
        {"txn": 7},
        {"iat": "now"},
    ],
    ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items())[:40],
)
def test_badly_typed_claims(changes):
    token = _sign(_txn_claims(**changes))
    assert _reason(lambda: _txn_verifier().verify(token, KEYS)) is Reason.BAD_CLAIMS


def test_audience_time_and_issuer():
    assert _txn_verifier().verify(_sign(_txn_claims(aud=[DOMAIN])), KEYS).trust_domain == DOMAIN
    foreign = _sign(_txn_claims(aud="elsewhere.test"))
    assert _reason(lambda: _txn_verifier().verify(foreign, KEYS)) is Reason.WRONG_AUDIENCE
    token = _sign(_txn_claims())
    assert _reason(lambda: _txn_verifier(NOW + 60).verify(token, KEYS)) is Reason.EXPIRED
    assert _reason(lambda: _txn_verifier(NOW - 31).verify(token, KEYS)) is Reason.NOT_YET_VALID
    other = _sign(_txn_claims(iss="https://someone.else"))
    assert _reason(lambda: _txn_verifier().verify(other, KEYS)) is Reason.WRONG_ISSUER
    unknown = EcKey.generate("k2").sign(
        {"alg": "ES256", "typ": "txntoken+jwt", "kid": "k2"}, _txn_claims()
    )
    assert _reason(lambda: _txn_verifier().verify(unknown, KEYS)) is Reason.UNKNOWN_KEY


def test_the_actor_chain_of_an_access_token():
    act = {"sub": "spiffe://x/orders", "act": {"sub": "spiffe://x/gateway"}}
    claims = _access_verifier().verify(_sign(_access_claims(act=act), typ="at+jwt"), KEYS)
    assert claims.actors == ("spiffe://x/orders", "spiffe://x/gateway")
    assert _access_verifier().verify(_sign(_access_claims(), typ="at+jwt"), KEYS).actors == ()
    for bad in ("spiffe://x/orders", {"sub": ""}, {"sub": 1}, {"act": {"sub": "a"}}):
        token = _sign(_access_claims(act=bad), typ="at+jwt")
        assert _reason(lambda t=token: _access_verifier().verify(t, KEYS)) is Reason.BAD_CLAIMS
    deep: dict = {"sub": "a"}
    for _ in range(MAX_ACT_NESTING):
        deep = {"sub": "a", "act": deep}
    assert _reason(lambda: actor_chain({"act": deep})) is Reason.BAD_CLAIMS


def test_the_txn_token_metadata_entry():
    from tokensvc_client.wire import txn_token

    assert txn_token((("authorization", "Bearer x"),)) is None
    assert txn_token((("txn-token", "a.b.c"),)) == "a.b.c"
    for bad in (
        (("txn-token", "a.b.c"), ("txn-token", "d.e.f")),  # the draft: exactly one token
        (("txn-token", "a.b.c d"),),
        (("txn-token", ""),),
        (("txn-token", b"a.b.c"),),
    ):
        assert _reason(lambda b=bad: txn_token(b)) is Reason.MALFORMED
    seen = {"a.b.c"}  # values a verifier accepted before: their form is not checked again
    assert txn_token((("txn-token", "a.b.c"),), seen) == "a.b.c"
    # txn_token never adds: only the interceptor does, after verification (a client
    # sending junk fills nothing)
    assert txn_token((("txn-token", "x.y.z"),), seen) == "x.y.z" and seen == {"a.b.c"}
    doubled = (("txn-token", "a.b.c"), ("txn-token", "a.b.c"))
    assert _reason(lambda: txn_token(doubled, seen)) is Reason.MALFORMED  # seen or not


def test_the_interceptor_remembers_only_verified_txn_token_values():
    """What a client sends never fills the memo of well-formed values: junk that is
    well-formed but does not verify is not kept; a verified value is, up to the cache size."""
    access = Verifier(ISSUER, "orders", clock=lambda: NOW, cache_size=8)
    rules = TransactionTokens.of(DOMAIN, (), issuer=ISSUER, leeway=30, clock=lambda: NOW)
    auth = Authenticator(access, transactions=rules)
    bearer = ("authorization", f"Bearer {_sign(_access_claims(), typ='at+jwt')}")

    def decide(txn: str) -> object:
        decision = auth.decide_call("/shop.Orders/Get", (bearer, ("txn-token", txn)))
        try:
            next(decision)  # a key request
            decision.send(KEYS)
        except StopIteration as done:
            return done.value
        raise AssertionError("more than one key request")

    for i in range(50):
        assert isinstance(decide(f"junk.{i}.x"), Rejection)
    assert len(auth._txn_values) == 0
    good = _sign(_txn_claims())
    assert not isinstance(decide(good), Rejection)
    assert good in auth._txn_values and len(auth._txn_values) <= access.cache_size
