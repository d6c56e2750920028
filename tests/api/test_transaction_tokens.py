"""MintTransactionToken (draft-ietf-oauth-transaction-tokens-10) over mTLS: minted at the
edge with req_wl from the certificate, replacements only narrow, never an access token."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from tests.support import audit_entries, wait_until
from tests.support.chains import (
    BILLING,
    DOMAIN,
    GATEWAY,
    ORDERS,
    POLICY,
    USER_ROLES,
    header,
    payload,
    write_chain_pki,
)
from tokensvc_client.v1 import tokensvc_pb2 as pb

TXN = "urn:ietf:params:oauth:token-type:txn_token"
WORKLOAD = "urn:tokensvc:params:oauth:token-type:workload"


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory):
    return write_chain_pki(tmp_path_factory.mktemp("chain-pki"))


@pytest.fixture
def svc(mtls_service):
    return mtls_service(POLICY, trust_domain=DOMAIN, txn_token_ttl=60, txn_token_ttl_cap=120)


def _user(svc, subject="alice") -> pb.TokenPair:
    request = pb.IssueRequest(subject=subject, roles=USER_ROLES, audience=["shop"])
    return svc.stub("login").Issue(request).tokens


def _mint(svc, workload="gateway", **fields) -> pb.MintTransactionTokenResponse:
    return svc.stub(workload).MintTransactionToken(pb.MintTransactionTokenRequest(**fields))


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_the_edge_mints_a_transaction_token_per_the_draft(svc):
    user = _user(svc)
    before = int(time.time())
    got = _mint(
        svc,
        subject_token=user.access_token,
        scope=["orders:read"],
        request_details=json.dumps({"action": "BUY", "ticker": "MSFT", "quantity": "100"}),
        request_context=json.dumps({"req_ip": "203.0.113.7", "authn": "pwd"}),
        audience=DOMAIN,
    )
    assert got.issued_token_type == TXN and got.token_type == "N_A"
    assert header(got.txn_token) == {
        "alg": "ES256",
        "typ": "txntoken+jwt",
        "kid": header(user.access_token)["kid"],
    }
    claims = payload(got.txn_token)
    assert claims["aud"] == DOMAIN and claims["txn"] == got.txn
    assert claims["sub"] == "alice" and claims["scope"] == "orders:read"
    assert claims["req_wl"] == GATEWAY  # from the certificate: no request field names it
    assert claims["tctx"] == {"action": "BUY", "ticker": "MSFT", "quantity": "100"}
    assert claims["rctx"] == {"req_ip": "203.0.113.7", "authn": "pwd"}
    assert claims["sid"] == user.session_id
    assert before <= claims["iat"] and claims["exp"] - claims["iat"] <= 60
    assert got.expires_at.seconds == claims["exp"]
    # a Transaction Token is never an access token
    seen = svc.stub("orders").Introspect(pb.IntrospectRequest(token=got.txn_token))
    assert not seen.active
    entries = audit_entries(
        svc.server.settings.redis_url,
        lambda e: any(x["event"] == "txn_token_minted" for x in e),
    )
    (minted,) = [e for e in entries if e["event"] == "txn_token_minted"]
    assert minted["txn"] == got.txn and minted["peer"] == GATEWAY
    assert minted["session_id"] == user.session_id and minted["replaced"] == "0"


def test_lifetime_is_capped(svc):
    user = _user(svc)
    got = _mint(svc, subject_token=user.access_token, scope=["orders:read"], lifetime_seconds=9999)
    claims = payload(got.txn_token)
    assert claims["exp"] - claims["iat"] <= 120


def test_a_replacement_only_narrows_and_keeps_the_transaction(svc):
    user = _user(svc)
    first = _mint(
        svc,
        subject_token=user.access_token,
        scope=["orders:read", "billing:read"],
        request_details='{"order": 42}',
    )
    old = payload(first.txn_token)
    narrower = _mint(
        svc, "orders", subject_token=first.txn_token, subject_token_type=TXN, scope=["billing:read"]
    )
    new = payload(narrower.txn_token)
    assert narrower.txn == first.txn
    for same in ("txn", "sub", "aud", "tctx", "rctx", "sid"):
        assert new[same] == old[same], same
    assert new["scope"] == "billing:read" and new["exp"] <= old["exp"]
    assert new["req_wl"] == ORDERS and new["req_wl_chain"] == [GATEWAY, ORDERS]

    wider = pb.MintTransactionTokenRequest(
        subject_token=narrower.txn_token, subject_token_type=TXN, scope=["orders:read"]
    )
    err = _refused(lambda: svc.stub("orders").MintTransactionToken(wider))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "a replacement may only narrow the scope"
    context = pb.MintTransactionTokenRequest(
        subject_token=first.txn_token,
        subject_token_type=TXN,
        scope=["billing:read"],
        request_details='{"order": 43}',
    )
    err = _refused(lambda: svc.stub("orders").MintTransactionToken(context))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # billing's table does not allow replacements
    err = _refused(
        lambda: _mint(
            svc, "billing", subject_token=first.txn_token, subject_token_type=TXN, scope=["x"]
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "replacement not allowed"


def test_an_access_token_is_never_replaced_as_a_transaction_token(svc):
    user = _user(svc)
    err = _refused(
        lambda: _mint(
            svc,
            "orders",
            subject_token=user.access_token,
            subject_token_type=TXN,
            scope=["orders:read"],
        )
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "bad_type"


def test_scope_never_exceeds_the_subject_tokens_roles_or_the_policy(svc):
    user = _user(svc)
    err = _refused(lambda: _mint(svc, subject_token=user.access_token, scope=["admin"]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "scope beyond the subject token's roles"
    err = _refused(lambda: _mint(svc, subject_token=user.access_token, scope=["orders:write"]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "scope beyond what the policy allows"
    err = _refused(
        lambda: _mint(svc, "orders", subject_token=user.access_token, scope=["orders:read"])
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # orders may only replace


def test_a_workload_acting_on_its_own(svc):
    got = _mint(svc, "billing", subject_token_type=WORKLOAD, scope=["reindex"])
    claims = payload(got.txn_token)
    assert claims["sub"] == BILLING and claims["req_wl"] == BILLING and "sid" not in claims
    err = _refused(
        lambda: _mint(svc, "billing", subject_token_type=WORKLOAD, scope=["orders:read"])
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = _refused(lambda: _mint(svc, "orders", subject_token_type=WORKLOAD, scope=["reindex"]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "fields",
    [
        {"scope": []},
        {"scope": ["orders:read billing:read"]},
        {"scope": ["orders:read"], "audience": "elsewhere.example"},
        {"scope": ["orders:read"], "request_details": "[1, 2]"},
        {"scope": ["orders:read"], "request_context": "{not json"},
        {"scope": ["orders:read"], "request_details": json.dumps({"pad": "x" * 2000})},
        {"scope": ["orders:read"], "lifetime_seconds": -1},
        {
            "scope": ["orders:read"],
            "subject_token_type": "urn:ietf:params:oauth:token-type:refresh_token",
        },
    ],
    ids=[
        "no-scope",
        "space-in-scope",
        "other-audience",
        "tctx-not-object",
        "rctx-not-json",
        "tctx-too-large",
        "negative-lifetime",
        "refresh-type",
    ],
)
def test_malformed_requests_are_invalid_arguments(svc, fields):
    err = _refused(lambda: _mint(svc, subject_token=_user(svc).access_token, **fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_refresh_token_is_never_a_subject_token(svc):
    user = _user(svc)
    err = _refused(lambda: _mint(svc, subject_token=user.refresh_token, scope=["orders:read"]))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "refresh_token_as_access_token"


def test_expired_and_foreign_transaction_tokens_are_not_replaced(svc, mtls_service):
    user = _user(svc)
    short = _mint(svc, subject_token=user.access_token, scope=["orders:read"], lifetime_seconds=1)
    replace = pb.MintTransactionTokenRequest(
        subject_token=short.txn_token, subject_token_type=TXN, scope=["orders:read"]
    )

    def refused_as_expired() -> bool:
        try:
            svc.stub("orders").MintTransactionToken(replace)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return err.details() == "expired"
        return False

    wait_until(refused_as_expired, 10, what="the 1-second Transaction Token to expire")

    # another trust domain on the same key ring: the signature verifies, the aud does not
    other = mtls_service(POLICY, trust_domain="elsewhere.test")
    foreign = other.stub("gateway").MintTransactionToken(
        pb.MintTransactionTokenRequest(subject_token=user.access_token, scope=["orders:read"])
    )
    assert payload(foreign.txn_token)["aud"] == "elsewhere.test"
    err = _refused(
        lambda: _mint(
            svc, "orders", subject_token=foreign.txn_token, subject_token_type=TXN,
            scope=["orders:read"],
        )
    )  # fmt: skip
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "wrong_audience"


def test_revoking_the_session_ends_replacements(svc):
    user = _user(svc)
    got = _mint(svc, subject_token=user.access_token, scope=["orders:read"])
    svc.stub("login").Revoke(pb.RevokeRequest(session_id=user.session_id))
    err = _refused(
        lambda: _mint(
            svc, "orders", subject_token=got.txn_token, subject_token_type=TXN,
            scope=["orders:read"],
        )
    )  # fmt: skip
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "revoked"
    err = _refused(lambda: _mint(svc, subject_token=user.access_token, scope=["orders:read"]))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "revoked"
