"""AuthInterceptor (blocking server) and AioAuthInterceptor (asyncio server), end to end.

Every scenario runs against both, with a real tokensvc as the key source; the client side
is the same blocking gRPC code.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2
from jwcrypto import jwk, jws

from tests.client.conftest import METHODS, WORKER, bearer
from tokensvc.redis.embedded import free_port
from tokensvc_client import (
    Claims,
    Jwks,
    JwksCache,
    KeysUnavailable,
    NoClaims,
    Rejection,
    Unavailable,
    current_claims,
)
from tokensvc_client.jwks import KeyRequest
from tokensvc_client.verifier import b64url_decode

SERVERS = ["sync", "aio"]


def _forge(token: str, *, kid: str | None = None, key: jwk.JWK | None = None) -> str:
    """The claims of ``token`` signed by another key, under ``kid`` (default: the real one)."""
    header = json.loads(b64url_decode(token.split(".")[0]))
    payload = b64url_decode(token.split(".")[1])
    signer = jws.JWS(payload)
    protected = {"alg": "ES256", "typ": "at+jwt", "kid": kid or header["kid"]}
    signer.add_signature(
        key or jwk.JWK.generate(kty="EC", crv="P-256"), protected=json.dumps(protected)
    )
    return signer.serialize(compact=True)


def _rejected(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("server", SERVERS)
def test_valid_token_reaches_every_kind_of_handler_with_its_claims(
    tokensvc, client, make_protected, server
):
    protected = make_protected(tokensvc, server)
    pair = client.issue("alice", roles=["reader", "writer"])
    # the first round fetches keys (cold cache), the second verifies from the cache
    for _ in range(2):
        for kind in METHODS:
            seen = protected.call(kind, bearer(pair.access_token))
            assert seen and all(s["sub"] == "alice" for s in seen), kind
            assert all(s["roles"] == ["reader", "writer"] for s in seen)
    assert len(protected.fetches) == 1
    assert len(protected.calls) == 8
    if server == "sync":  # never on gRPC's polling thread, which serves every connection
        assert protected.fetches[0].startswith(WORKER)


@pytest.mark.parametrize("server", SERVERS)
def test_rejections_abort_every_kind_with_only_the_reason_code(
    tokensvc, client, make_protected, server
):
    forged = _forge(client.issue("alice").access_token)
    for kind in METHODS:
        # a fresh service per kind: its first call decides while fetching keys (cold
        # cache), the second from the cache
        protected = make_protected(tokensvc, server)
        for metadata, reason in [
            (bearer(forged), "bad_signature"),
            (bearer(forged), "bad_signature"),
            ((), "missing_token"),
        ]:
            err = _rejected(protected.call, kind, metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, kind
            assert err.details() == f"invalid token: {reason}", kind
        assert protected.calls == []
        assert len(protected.fetches) == 1


@pytest.mark.parametrize("server", SERVERS)
def test_each_bad_credential_gets_its_reason(tokensvc, client, make_protected, server):
    protected = make_protected(tokensvc, server)
    pair = client.issue("alice")
    other_audience = client.issue("alice", audience=["billing"]).access_token
    access = pair.access_token
    cases = [
        ((), "missing_token"),
        ((("authorization", "Bearer"),), "malformed"),
        ((("authorization", "Bearer  "),), "malformed"),
        ((("authorization", f"Basic {access}"),), "malformed"),
        ((("authorization", f"Bearer {access} x"),), "malformed"),
        (
            (("authorization", f"Bearer {access}"), ("authorization", f"Bearer {access}")),
            "malformed",
        ),
        (bearer("not-a-jwt"), "malformed"),
        (bearer(other_audience), "wrong_audience"),
        (bearer(pair.refresh_token), "refresh_token_as_access_token"),
        (bearer(_forge(access)), "bad_signature"),
        (bearer(access[:-4] + "AAAA"), "bad_signature"),
    ]
    for metadata, reason in cases:
        err = _rejected(protected.call, "unary_unary", metadata)
        assert (err.code(), err.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            f"invalid token: {reason}",
        ), metadata
    # the scheme is case-insensitive
    for scheme in ("bearer", "BEARER"):
        assert protected.call("unary_unary", (("authorization", f"{scheme} {access}"),))
    assert protected.calls == ["unary", "unary"]


@pytest.mark.parametrize("server", SERVERS)
def test_expired_token_is_rejected(tokensvc, client, make_protected, server):
    pair = client.issue("alice")
    later = make_protected(tokensvc, server, clock=lambda: pair.access_expires_at + 1)
    err = _rejected(later.call, "unary_unary", bearer(pair.access_token))
    assert err.details() == "invalid token: expired"
    just_before = make_protected(tokensvc, server, clock=lambda: pair.access_expires_at - 1)
    assert just_before.call("unary_unary", bearer(pair.access_token))


@pytest.mark.parametrize("server", SERVERS)
def test_exempt_methods_need_no_token_and_see_no_claims(tokensvc, client, make_protected, server):
    protected = make_protected(tokensvc, server)
    token = client.issue("alice").access_token
    assert protected.health() == health_pb2.HealthCheckResponse.SERVING
    assert protected.call("unary_unary", bearer(token))[0]["sub"] == "alice"
    # an authenticated call before it leaves nothing behind in the worker thread or task
    for _ in range(4):
        assert protected.public() == {"claims": None}
    assert len(protected.fetches) == 1  # exempt calls never need keys


@pytest.mark.parametrize("server", SERVERS)
def test_forged_kids_cost_at_most_one_fetch_per_interval(tokensvc, client, make_protected, server):
    clock = FakeClock()
    protected = make_protected(
        tokensvc, server, cache_kw={"clock": clock, "min_refetch_interval": 30}
    )
    token = client.issue("alice").access_token
    assert protected.call("unary_unary", bearer(token))
    assert len(protected.fetches) == 1
    attacker = jwk.JWK.generate(kty="EC", crv="P-256")

    def flood(prefix: str, count: int) -> None:
        for i in range(count):
            forged = _forge(token, kid=f"{prefix}{i}", key=attacker)
            err = _rejected(protected.call, "unary_unary", bearer(forged))
            assert err.details() == "invalid token: unknown_key"

    flood("a", 10)
    assert len(protected.fetches) == 1  # keys fetched < 30 s ago: no refetch
    clock.now += 31
    flood("b", 20)
    assert len(protected.fetches) == 2  # one refetch for the first unknown kid, then none
    clock.now += 29
    flood("c", 5)
    assert len(protected.fetches) == 2
    clock.now += 2
    flood("d", 5)
    assert len(protected.fetches) == 3
    assert protected.call("unary_unary", bearer(token))  # valid tokens never wait on fetches
    assert len(protected.fetches) == 3


@pytest.mark.parametrize("server", SERVERS)
def test_revocation_hook_rejects_and_policy_hook_denies(tokensvc, client, make_protected, server):
    revoked: set[str] = set()

    def policy(method: str, claims: Claims) -> Rejection | None:
        if method == METHODS["unary_stream"] and "admin" not in claims.roles:
            return Rejection(grpc.StatusCode.PERMISSION_DENIED, "admin only")
        return None

    protected = make_protected(
        tokensvc, server, revocation_check=lambda c: c.session_id in revoked, policy=policy
    )
    pair = client.issue("alice")
    assert protected.call("unary_unary", bearer(pair.access_token))
    err = _rejected(protected.call, "unary_stream", bearer(pair.access_token))
    assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, "admin only")
    revoked.add(pair.session_id)
    err = _rejected(protected.call, "unary_unary", bearer(pair.access_token))
    assert err.details() == "invalid token: revoked"


@pytest.mark.parametrize("server", SERVERS)
def test_failing_hook_fails_closed(tokensvc, client, make_protected, server):
    def broken(claims: Claims) -> bool:
        raise RuntimeError("feed down")

    protected = make_protected(tokensvc, server, revocation_check=broken)
    err = _rejected(protected.call, "unary_unary", bearer(client.issue("alice").access_token))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert protected.calls == []


@pytest.mark.parametrize("server", SERVERS)
def test_no_keys_at_all_is_unavailable_not_unauthenticated(
    tokensvc, client, make_protected, server
):
    token = client.issue("alice").access_token
    unreachable = SimpleNamespace(target=f"127.0.0.1:{free_port()}", settings=tokensvc.settings)
    protected = make_protected(unreachable, server)
    err = _rejected(protected.call, "unary_unary", bearer(token))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAVAILABLE, "token keys unavailable")
    assert len(protected.fetches) == 1
    _rejected(protected.call, "unary_unary", bearer(token))
    assert len(protected.fetches) == 1  # a failed fetch is not retried at once
    assert protected.calls == []


def test_current_claims_outside_a_call_raises():
    with pytest.raises(NoClaims):
        current_claims()


# -- the JWKS cache on its own -----------------------------------------------------------


def test_cache_refetches_after_max_age_and_keeps_the_last_good_set_on_failure(client, caplog):
    good = client.get_keys()
    results: list[Jwks | Exception] = [Jwks(good.jwks_json, 60)]
    clock = FakeClock()

    def fetch() -> Jwks:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    cache = JwksCache(fetch, clock=clock, retry_interval=5)
    first = cache.answer()
    assert first is not None and len(first) >= 1
    clock.now += 59
    assert cache.answer() is first and results == []
    clock.now += 1  # max age reached: refetch, which fails; the old set is still served
    results.append(Unavailable("UNAVAILABLE: down"))
    assert cache.answer() is first
    assert "JWKS fetch failed" in caplog.text
    clock.now += 1
    assert cache.answer() is first  # within retry_interval: no attempt (results untouched)
    clock.now += 5
    results.append(Jwks('{"keys": "not a list"}', 60))  # garbage counts as a failure
    assert cache.answer() is first and results == []
    clock.now += 5
    results.append(good)
    latest = cache.answer()
    assert latest is not None and latest is not first
    results.append(Unavailable("UNAVAILABLE: down"))
    with pytest.raises(KeysUnavailable):  # an explicit load reports the failure
        cache.load()
    assert cache.cached() is latest


def test_unknown_kid_request_after_a_newer_set_arrived_needs_no_fetch(client):
    fetched: list[int] = []

    def fetch() -> Jwks:
        fetched.append(1)
        return client.get_keys()

    clock = FakeClock()
    cache = JwksCache(fetch, clock=clock)
    old = cache.load()
    clock.now += 31
    newer = cache.answer(KeyRequest(lacking=old))
    assert newer is not None and newer is not old and len(fetched) == 2
    # another caller that also saw `old` gets the newer set without a fetch
    assert cache.answer(KeyRequest(lacking=old)) is newer and len(fetched) == 2
    # and one that saw the newest set gets nothing newer within the interval
    assert cache.answer(KeyRequest(lacking=newer)) is None and len(fetched) == 2


def test_cache_waits_between_failed_fetches_when_it_has_nothing():
    clock = FakeClock()
    attempts: list[float] = []

    def fetch() -> Jwks:
        attempts.append(clock.now)
        raise Unavailable("UNAVAILABLE: down")

    cache = JwksCache(fetch, clock=clock, retry_interval=5)
    assert cache.answer() is None and cache.answer() is None
    clock.now += 5
    assert cache.answer() is None
    assert attempts == [1000.0, 1005.0]


@pytest.mark.parametrize("server", SERVERS)
def test_remembered_decisions_keep_each_tokens_claims_and_every_per_call_check(
    tokensvc, client, make_protected, server
):
    """Warm calls reuse the decision for an exact authorization value (and the handler
    wrapped for its claims), yet two tokens alternating each reach the handler with their
    own claims, a revocation is seen on the next call, and a second authorization header
    beside a remembered one is still malformed."""
    revoked: set[str] = set()
    protected = make_protected(tokensvc, server, revocation_check=lambda c: c.session_id in revoked)
    alice, bob = client.issue("alice"), client.issue("bob")
    for _ in range(3):
        for pair, subject in ((alice, "alice"), (bob, "bob")):
            seen = protected.call("unary_unary", bearer(pair.access_token))
            assert [s["sub"] for s in seen] == [subject]
    revoked.add(alice.session_id)
    err = _rejected(protected.call, "unary_unary", bearer(alice.access_token))
    assert err.details() == "invalid token: revoked"
    assert protected.call("unary_unary", bearer(bob.access_token))
    twice = bearer(bob.access_token) + bearer(bob.access_token)
    err = _rejected(protected.call, "unary_unary", twice)
    assert err.details() == "invalid token: malformed"
