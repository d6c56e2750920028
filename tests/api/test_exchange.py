"""Exchange (RFC 8693) at the token service over mTLS: never broader than the subject token,
an act claim per hop, bounded depth, refusals PERMISSION_DENIED and audited."""

from __future__ import annotations

import logging

import grpc
import pytest

from tests.support import audit_entries
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
from tokensvc_client.peer import certificate_thumbprint
from tokensvc_client.v1 import tokensvc_pb2 as pb

ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory):
    """The development PKI plus the edge gateway (replaces the session's for this module)."""
    return write_chain_pki(tmp_path_factory.mktemp("chain-pki"))


@pytest.fixture
def svc(mtls_service):
    return mtls_service(POLICY, trust_domain=DOMAIN, max_act_depth=3)


def _user(svc, roles=USER_ROLES, subject="alice") -> pb.TokenPair:
    request = pb.IssueRequest(subject=subject, roles=roles, audience=["shop"])
    return svc.stub("login").Issue(request).tokens


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_each_hop_narrows_and_is_named_in_the_act_chain(svc, dev_pki):
    user = _user(svc)
    first = svc.stub("gateway").Exchange(
        pb.ExchangeRequest(
            subject_token=user.access_token, audience=["orders"], roles=["orders:read"]
        )
    )
    assert first.issued_token_type == ACCESS and first.token_type == "Bearer"
    assert first.session_id == user.session_id and list(first.roles) == ["orders:read"]
    claims, subject = payload(first.access_token), payload(user.access_token)
    assert header(first.access_token)["typ"] == "at+jwt"
    assert claims["sub"] == "alice" and claims["aud"] == ["orders"]
    assert claims["roles"] == ["orders:read"] and claims["sid"] == subject["sid"]
    assert claims["exp"] <= subject["exp"] and claims["jti"] != subject["jti"]
    assert claims["act"] == {"sub": GATEWAY}
    gateway_thumb = certificate_thumbprint(dev_pki["gateway"].cert.read_bytes())
    assert claims["cnf"] == {"x5t#S256": gateway_thumb}

    # orders received it (aud "orders") and exchanges it for billing: nested act
    second = svc.stub("orders").Exchange(
        pb.ExchangeRequest(subject_token=first.access_token, audience=["billing"])
    )
    claims2 = payload(second.access_token)
    assert claims2["act"] == {"sub": ORDERS, "act": {"sub": GATEWAY}}
    assert claims2["roles"] == ["orders:read"]  # all the subject token has that may pass
    assert claims2["sid"] == subject["sid"] and claims2["exp"] <= claims["exp"]
    orders_thumb = certificate_thumbprint(dev_pki["orders"].cert.read_bytes())
    assert claims2["cnf"] == {"x5t#S256": orders_thumb}
    seen = svc.stub("billing").Introspect(pb.IntrospectRequest(token=second.access_token))
    assert seen.active and list(seen.audience) == ["billing"]

    entries = audit_entries(
        svc.server.settings.redis_url,
        lambda e: sum(x["event"] == "exchanged" for x in e) == 2,
    )
    exchanged = [e for e in entries if e["event"] == "exchanged"]
    assert [e["peer"] for e in exchanged] == [GATEWAY, ORDERS]
    assert [e["depth"] for e in exchanged] == ["1", "2"]
    assert all(e["session_id"] == user.session_id for e in exchanged)


def test_an_exchanged_token_dies_with_its_session(svc):
    user = _user(svc)
    got = svc.stub("gateway").Exchange(
        pb.ExchangeRequest(subject_token=user.access_token, audience=["orders"])
    )
    svc.stub("login").Revoke(pb.RevokeRequest(session_id=user.session_id))
    seen = svc.stub("orders").Introspect(pb.IntrospectRequest(token=got.access_token))
    assert not seen.active
    err = _refused(
        lambda: svc.stub("orders").Exchange(
            pb.ExchangeRequest(subject_token=got.access_token, audience=["billing"])
        )
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "revoked"


@pytest.mark.parametrize(
    ("workload", "request_", "why"),
    [
        (
            "gateway",
            pb.ExchangeRequest(audience=["billing"]),
            "audience not allowed for this workload",
        ),
        (
            "gateway",
            pb.ExchangeRequest(audience=["orders"], roles=["admin"]),
            "roles must be a subset of the subject token's",
        ),
        (
            "gateway",
            pb.ExchangeRequest(audience=["orders"], impersonate=True),
            "impersonation not allowed",
        ),
        (
            "orders",  # a token for "shop" was not sent to orders
            pb.ExchangeRequest(audience=["billing"]),
            "subject token is not addressed to this workload",
        ),
        ("login", pb.ExchangeRequest(audience=["orders"]), "no exchange policy for this workload"),
    ],
    ids=["audience", "roles", "impersonation", "not-addressed", "no-table"],
)
def test_exchanges_beyond_the_policy_are_denied_and_audited(svc, workload, request_, why):
    user = _user(svc)
    request_.subject_token = user.access_token
    err = _refused(lambda: svc.stub(workload).Exchange(request_))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == why
    entries = audit_entries(
        svc.server.settings.redis_url,
        lambda e: any(x["event"] == "exchange_denied" for x in e),
    )
    (denied,) = [e for e in entries if e["event"] == "exchange_denied"]
    assert denied["reason"] == why and denied["rpc"] == "Exchange"
    assert denied["session_id"] == user.session_id


def test_the_policy_caps_the_roles_passed_on(svc):
    user = _user(svc)
    first = svc.stub("gateway").Exchange(
        pb.ExchangeRequest(subject_token=user.access_token, audience=["orders"])
    )
    assert list(first.roles) == USER_ROLES  # the gateway's table has no cap
    err = _refused(
        lambda: svc.stub("orders").Exchange(
            pb.ExchangeRequest(
                subject_token=first.access_token, audience=["billing"], roles=["orders:write"]
            )
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "roles beyond what the policy lets pass"


def test_impersonation_where_allowed_adds_no_actor_and_depth_is_bounded(svc, caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    user = _user(svc)
    token = user.access_token
    for workload, audience in (("gateway", "orders"), ("orders", "billing")):
        token = (
            svc.stub(workload)
            .Exchange(pb.ExchangeRequest(subject_token=token, audience=[audience]))
            .access_token
        )
    # billing may impersonate: the chain stays as it was
    same = svc.stub("billing").Exchange(
        pb.ExchangeRequest(subject_token=token, audience=["orders"], impersonate=True)
    )
    assert payload(same.access_token)["act"] == {"sub": ORDERS, "act": {"sub": GATEWAY}}
    # a delegation is routine (the stream has it); an impersonation is logged as well
    logged = [r for r in caplog.records if getattr(r, "event", "") == "exchanged"]
    assert [getattr(r, "impersonated", "") for r in logged] == ["1"]
    # delegating instead makes a chain of 3 (the limit here), and one more hop is refused
    third = svc.stub("billing").Exchange(
        pb.ExchangeRequest(subject_token=token, audience=["orders"])
    )
    assert payload(third.access_token)["act"]["sub"] == BILLING
    err = _refused(
        lambda: svc.stub("orders").Exchange(
            pb.ExchangeRequest(subject_token=third.access_token, audience=["billing"])
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "act chain deeper than 3"


def test_refresh_tokens_and_transaction_tokens_are_never_subject_tokens(svc):
    user = _user(svc)
    gateway = svc.stub("gateway")
    err = _refused(
        lambda: gateway.Exchange(
            pb.ExchangeRequest(subject_token=user.refresh_token, audience=["orders"])
        )
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "refresh_token_as_access_token"
    typed = pb.ExchangeRequest(
        subject_token=user.refresh_token,
        subject_token_type="urn:ietf:params:oauth:token-type:refresh_token",
        audience=["orders"],
    )
    assert _refused(lambda: gateway.Exchange(typed)).code() == grpc.StatusCode.INVALID_ARGUMENT
    txn = gateway.MintTransactionToken(
        pb.MintTransactionTokenRequest(subject_token=user.access_token, scope=["orders:read"])
    ).txn_token
    err = _refused(
        lambda: gateway.Exchange(pb.ExchangeRequest(subject_token=txn, audience=["orders"]))
    )
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "bad_type"


@pytest.mark.parametrize(
    "request_",
    [pb.ExchangeRequest(audience=[]), pb.ExchangeRequest(audience=["orders"], roles=[""])],
    ids=["no-audience", "empty-role"],
)
def test_malformed_exchanges_are_invalid_arguments(svc, request_):
    request_.subject_token = _user(svc).access_token
    err = _refused(lambda: svc.stub("gateway").Exchange(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
