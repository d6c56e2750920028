"""Step-up authentication (RFC 9470) in AuthInterceptor and AioAuthInterceptor, end to end.

Tokens come from the real tokensvc; the sample service's methods carry step-up
requirements; a denied caller must learn from the status and trailers what to do.
"""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import grpc.aio
import pytest

from tests.client.conftest import METHODS, SERVICE, bearer
from tokensvc_client import (
    DEFAULT_EXEMPT,
    AioAuthInterceptor,
    AsyncJwksCache,
    AuthInterceptor,
    Claims,
    Jwks,
    JwksCache,
    PermissionDenied,
    Reason,
    Rejection,
    StepUp,
    from_rpc_error,
)
from tokensvc_client._handlers import MethodFilter

SERVERS = ["sync", "aio"]
ROLE_DENIED = (grpc.StatusCode.PERMISSION_DENIED, "insufficient role")
AUTH_DENIED = (grpc.StatusCode.PERMISSION_DENIED, "insufficient user authentication")


def _denied(protected, kind: str, token: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        protected.call(kind, bearer(token))
    return err.value


def _status(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return err.code(), err.details()


def _trailers(err: grpc.RpcError) -> dict[str, str]:
    return {key: value for key, value in err.trailing_metadata() or ()}


@pytest.mark.parametrize("server", SERVERS)
def test_missing_role_is_denied_on_every_kind_and_exact_entry_beats_prefix(
    tokensvc, client, make_protected, server
):
    protected = make_protected(
        tokensvc,
        server,
        step_up={
            f"/{SERVICE}/": StepUp(roles=["admin"]),  # every method of the service
            METHODS["unary_stream"]: StepUp(),  # ... but this one requires nothing
        },
    )
    reader = client.issue("alice", roles=["reader"]).access_token
    admin = client.issue("root", roles=["reader", "admin"]).access_token
    denied_kinds = ["unary_unary", "stream_unary", "stream_stream"]
    for kind in denied_kinds:  # the first call decides on a cold key cache
        err = _denied(protected, kind, reader)
        assert _status(err) == ROLE_DENIED, kind
        assert _trailers(err) == {"tokensvc-reason": "insufficient_role"}, kind
        failed = from_rpc_error(err)
        assert isinstance(failed, PermissionDenied)
        assert failed.reason == Reason.INSUFFICIENT_ROLE
    assert protected.calls == []
    assert protected.call("unary_stream", bearer(reader))[0]["sub"] == "alice"
    for kind in METHODS:
        assert protected.call(kind, bearer(admin))[0]["sub"] == "root", kind
    assert protected.public() == {"claims": None}  # exempt methods stay exempt


@pytest.mark.parametrize("server", SERVERS)
def test_wrong_or_missing_acr_asks_for_another_authentication_level(
    tokensvc, client, make_protected, server
):
    protected = make_protected(
        tokensvc, server, step_up={METHODS["unary_unary"]: StepUp(acr=["mfa", "hwk"])}
    )
    challenge = (
        'Bearer error="insufficient_user_authentication", '
        'error_description="A different authentication level is required", '
        'acr_values="hwk mfa"'
    )
    for acr in ("", "pwd"):
        token = client.issue("alice", acr=acr).access_token
        err = _denied(protected, "unary_unary", token)
        assert _status(err) == AUTH_DENIED, acr
        assert _trailers(err) == {
            "tokensvc-reason": "insufficient_user_authentication",
            "www-authenticate": challenge,
        }, acr
        failed = from_rpc_error(err)
        assert failed.reason == Reason.INSUFFICIENT_USER_AUTHENTICATION
        assert failed.trailer("WWW-Authenticate") == challenge
        # methods without a step-up entry take the same token
        assert protected.call("stream_unary", bearer(token))[0]["sub"] == "alice"
    for acr in ("mfa", "hwk"):
        token = client.issue("alice", acr=acr).access_token
        assert protected.call("unary_unary", bearer(token))[0]["sub"] == "alice"
    assert protected.calls == ["client_stream", "client_stream", "unary", "unary"]


@pytest.mark.parametrize("server", SERVERS)
def test_old_or_missing_auth_time_asks_for_a_recent_authentication(
    tokensvc, client, make_protected, server
):
    now = int(time.time())
    protected = make_protected(
        tokensvc,
        server,
        clock=lambda: float(now),  # the verifier's clock decides the age; leeway is 30 s
        step_up={METHODS["unary_unary"]: StepUp(max_auth_age=300)},
    )
    challenge = (
        'Bearer error="insufficient_user_authentication", '
        'error_description="More recent authentication is required", '
        'max_age="300"'
    )
    too_old = client.issue("alice", auth_time=now - 301).access_token
    never = client.issue("alice").access_token
    for token in (too_old, never):
        err = _denied(protected, "unary_unary", token)
        assert _status(err) == AUTH_DENIED
        assert _trailers(err)["www-authenticate"] == challenge
    just_in_time = client.issue("alice", auth_time=now - 300).access_token
    assert protected.call("unary_unary", bearer(just_in_time))[0]["sub"] == "alice"
    assert protected.calls == ["unary"]


@pytest.mark.parametrize("server", SERVERS)
def test_role_is_checked_first_and_the_challenge_names_every_requirement(
    tokensvc, client, make_protected, server
):
    now = int(time.time())
    protected = make_protected(
        tokensvc,
        server,
        clock=lambda: float(now),
        step_up={
            f"/{SERVICE}/": StepUp(roles=["payments"], acr=["mfa"], max_auth_age=60),
        },
    )
    # re-authenticating cannot give a role: a token lacking one is told so first
    err = _denied(protected, "unary_stream", client.issue("bob", acr="pwd").access_token)
    assert _status(err) == ROLE_DENIED
    stale = client.issue("bob", roles=["payments"], acr="mfa", auth_time=now - 61)
    err = _denied(protected, "unary_stream", stale.access_token)
    assert _status(err) == AUTH_DENIED
    assert _trailers(err)["www-authenticate"] == (
        'Bearer error="insufficient_user_authentication", '
        'error_description="More recent authentication is required", '
        'acr_values="mfa", max_age="60"'
    )
    fresh = client.issue("bob", roles=["payments"], acr="mfa", auth_time=now - 5)
    assert [s["sub"] for s in protected.call("unary_stream", bearer(fresh.access_token))] == [
        "bob",
        "bob",
    ]


@pytest.mark.parametrize("server", SERVERS)
def test_step_up_runs_after_revocation_and_before_the_policy_hook(
    tokensvc, client, make_protected, server
):
    revoked: set[str] = set()
    policy_saw: list[str] = []

    def policy(method: str, claims: Claims) -> Rejection | None:
        policy_saw.append(claims.subject)
        return None

    protected = make_protected(
        tokensvc,
        server,
        revocation_check=lambda c: c.session_id in revoked,
        policy=policy,
        step_up={METHODS["unary_unary"]: StepUp(roles=["admin"])},
    )
    pair = client.issue("mallory")
    err = _denied(protected, "unary_unary", pair.access_token)
    assert _status(err) == ROLE_DENIED
    assert policy_saw == []  # a step-up denial never reaches the policy
    revoked.add(pair.session_id)
    err = _denied(protected, "unary_unary", pair.access_token)
    assert _status(err) == (grpc.StatusCode.UNAUTHENTICATED, "invalid token: revoked")
    assert _trailers(err) == {}
    assert protected.call("unary_unary", bearer(client.issue("root", roles=["admin"]).access_token))
    assert policy_saw == ["root"]


@pytest.mark.parametrize("server", SERVERS)
def test_asyncio_callers_read_the_reason_too(tokensvc, client, make_protected, server):
    protected = make_protected(
        tokensvc, server, step_up={METHODS["unary_unary"]: StepUp(acr=["mfa"])}
    )
    token = client.issue("alice", acr="pwd").access_token

    async def call() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(protected.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(METHODS["unary_unary"])(
                    b"x", metadata=bearer(token), timeout=10
                )
            return err.value

    failed = from_rpc_error(asyncio.run(call()))
    assert isinstance(failed, PermissionDenied)
    assert failed.reason == "insufficient_user_authentication"
    assert 'acr_values="mfa"' in failed.trailer("www-authenticate")


def test_step_up_requirements_are_checked_when_configured():
    assert StepUp(roles=["a", "b"], acr=("mfa",)) == StepUp(
        roles=frozenset({"b", "a"}), acr=frozenset({"mfa"})
    )
    assert hash(StepUp(roles=["a"])) == hash(StepUp(roles={"a"}))
    with pytest.raises(TypeError):
        StepUp(roles="admin")  # would silently require the roles "a", "d", "m", ...
    with pytest.raises(TypeError):
        StepUp(acr="mfa")
    for bad in (
        {"acr": ["two words"]},
        {"acr": ['q"uote']},
        {"acr": [""]},
        {"roles": [""]},
        {"max_auth_age": -1},
    ):
        with pytest.raises(ValueError):
            StepUp(**bad)


def test_step_up_keys_must_be_method_names(client):
    async def fetch() -> Jwks:
        raise AssertionError("not called")

    for make in (
        lambda step_up: AuthInterceptor(
            JwksCache(client.get_keys), issuer="i", audience="a", step_up=step_up
        ),
        lambda step_up: AioAuthInterceptor(
            AsyncJwksCache(fetch), issuer="i", audience="a", step_up=step_up
        ),
    ):
        with pytest.raises(ValueError):
            make({"tokensvc.test.Sample/": StepUp()})  # no leading "/"
        # neither a full method name nor a prefix ending in "/": would protect nothing
        for key in ("/shop.Admin", "/shop.", "/shop.Admin/Refund/", "/shop Admin/X", "//X"):
            with pytest.raises(ValueError, match=re.escape(repr(key))):
                make({key: StepUp(roles=["admin"])})
        with pytest.raises(TypeError):
            make({METHODS["unary_unary"]: {"roles": ["admin"]}})  # not a StepUp
        make({METHODS["unary_unary"]: StepUp(roles=["admin"])})
        make({"/tokensvc.test.Sample/": StepUp(roles=["admin"]), "/": StepUp()})


def test_exempt_entries_must_be_method_names(client):
    for bad in ("/shop.Admin", "/grpc.reflection.", "shop.Admin/Get"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            AuthInterceptor(JwksCache(client.get_keys), issuer="i", audience="a", exempt=[bad])
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            AioAuthInterceptor(
                AsyncJwksCache(client.get_keys), issuer="i", audience="a", exempt=[bad]
            )
    # the defaults name every method of health checking and both reflection versions
    exempt = MethodFilter(DEFAULT_EXEMPT)
    for method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert method in exempt
    assert "/grpc.reflection.v1.Other/X" not in exempt
