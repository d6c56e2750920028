"""Every RPC's happy path and its input validation (docs/design.md, Tokens; Errors)."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import b64url_decode


def _segments(token: str) -> tuple[dict, dict]:
    header, payload, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload))


def test_issue_mints_an_rfc9068_access_token_with_exactly_the_spec_claims(stub):
    auth_time = Timestamp(seconds=1_700_000_000)
    pair = stub.Issue(
        pb.IssueRequest(
            subject="alice",
            roles=["reader", "writer"],
            client_id="web",
            acr="mfa",
            amr=["pwd", "otp"],
            auth_time=auth_time,
            session_label="laptop",
        )
    ).tokens
    header, claims = _segments(pair.access_token)
    keys = json.loads(stub.GetKeys(pb.GetKeysRequest()).jwks)["keys"]
    assert header == {"alg": "ES256", "typ": "at+jwt", "kid": keys[0]["kid"]}
    assert set(claims) == {
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "nbf",
        "jti",
        "sid",
        "client_id",
        "roles",
        "acr",
        "amr",
        "auth_time",
    }
    assert claims["sub"] == "alice" and claims["aud"] == ["mesh"]
    assert claims["roles"] == ["reader", "writer"] and claims["amr"] == ["pwd", "otp"]
    assert claims["auth_time"] == 1_700_000_000 and claims["sid"] == pair.session_id
    assert claims["exp"] - claims["iat"] == 900
    assert pair.token_type == "Bearer"
    assert pair.access_expires_at.seconds == claims["exp"]
    assert pair.refresh_token.startswith("tsr1_") and pair.session_id in pair.refresh_token
    assert pair.refresh_expires_at.seconds > pair.access_expires_at.seconds


def test_issue_without_optional_fields_omits_them_and_uses_the_default_audience(stub):
    pair = stub.Issue(pb.IssueRequest(subject="bob")).tokens
    _header, claims = _segments(pair.access_token)
    assert "acr" not in claims and "amr" not in claims and "auth_time" not in claims
    assert claims["aud"] == ["mesh"] and claims["roles"] == [] and claims["client_id"] == ""


def test_issue_with_explicit_audience(stub):
    pair = stub.Issue(pb.IssueRequest(subject="bob", audience=["billing", "orders"])).tokens
    info = stub.Introspect(pb.IntrospectRequest(token=pair.access_token))
    assert list(info.audience) == ["billing", "orders"]


def test_introspect_access_token_reports_every_field(stub):
    pair = stub.Issue(
        pb.IssueRequest(subject="alice", roles=["r"], client_id="web", acr="mfa")
    ).tokens
    info = stub.Introspect(pb.IntrospectRequest(token=pair.access_token))
    _header, claims = _segments(pair.access_token)
    assert info.active and info.token_type == "access"
    assert (info.subject, list(info.roles), info.client_id, info.acr) == (
        "alice",
        ["r"],
        "web",
        "mfa",
    )
    assert info.issuer == "https://tokensvc.test" and info.session_id == pair.session_id
    assert info.token_id == claims["jti"]
    assert info.expires_at.seconds == claims["exp"] and info.issued_at.seconds == claims["iat"]
    assert info.not_before.seconds == claims["nbf"]


def test_introspect_refresh_token(stub):
    pair = stub.Issue(pb.IssueRequest(subject="alice", client_id="web", roles=["r"])).tokens
    info = stub.Introspect(pb.IntrospectRequest(token=pair.refresh_token))
    assert info.active and info.token_type == "refresh"
    assert (info.subject, info.client_id, info.session_id) == ("alice", "web", pair.session_id)
    assert info.expires_at.seconds == pair.refresh_expires_at.seconds


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "tsr1_" + "0" * 64 + "_" + "1" * 64])
def test_introspect_of_an_unknown_token_is_inactive_and_nothing_else(stub, token):
    assert stub.Introspect(pb.IntrospectRequest(token=token)) == pb.IntrospectResponse(active=False)


def test_getkeys_publishes_public_keys_only(stub):
    reply = stub.GetKeys(pb.GetKeysRequest())
    keys = json.loads(reply.jwks)["keys"]
    assert reply.max_age_seconds == 300
    assert len(keys) == 1
    assert keys[0]["kty"] == "EC" and keys[0]["crv"] == "P-256" and keys[0]["alg"] == "ES256"
    assert "d" not in keys[0]


BAD_REQUESTS = [
    ("Issue", pb.IssueRequest(), "subject"),
    ("Issue", pb.IssueRequest(subject="x" * 257), "subject"),
    ("Issue", pb.IssueRequest(subject="a\nb"), "subject"),
    ("Issue", pb.IssueRequest(subject="a", roles=["r"] * 33), "roles"),
    ("Issue", pb.IssueRequest(subject="a", roles=[""]), "roles"),
    ("Issue", pb.IssueRequest(subject="a", roles=["r" * 129]), "roles"),
    ("Issue", pb.IssueRequest(subject="a", audience=["x" * 257]), "audience"),
    ("Issue", pb.IssueRequest(subject="a", session_label="l" * 257), "session_label"),
    ("Issue", pb.IssueRequest(subject="a", client_id="c" * 257), "client_id"),
    ("Refresh", pb.RefreshRequest(), "refresh_token"),
    ("Refresh", pb.RefreshRequest(refresh_token="t" * 5000), "refresh_token"),
    ("Introspect", pb.IntrospectRequest(), "token"),
    ("Introspect", pb.IntrospectRequest(token="x" * 5000), "token"),
    ("Introspect", pb.IntrospectRequest(token="é"), "token"),
    ("Revoke", pb.RevokeRequest(), "target"),
    ("Revoke", pb.RevokeRequest(session_id="not-a-session"), "session_id"),
    ("Revoke", pb.RevokeRequest(subject=""), "subject"),
    ("Revoke", pb.RevokeRequest(token=""), "token"),
    ("Revoke", pb.RevokeRequest(subject="a", reason="r" * 513), "reason"),
]


@pytest.mark.parametrize(("method", "request_", "field"), BAD_REQUESTS)
def test_bad_requests_are_invalid_argument_naming_the_field(stub, method, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_refresh_with_a_malformed_token_is_unauthenticated(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Refresh(pb.RefreshRequest(refresh_token="not-a-refresh-token"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Traceback" not in err.value.details()


def test_issue_refuses_claims_that_would_make_an_oversized_token(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Issue(pb.IssueRequest(subject="a", roles=["r" * 128] * 32))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token limit" in err.value.details()
