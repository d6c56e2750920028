"""Certificate-bound tokens (RFC 8705) at the token service: Issue binds, Refresh of a
bound family needs the same certificate, Introspect reports the binding."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.support.rpc import refused
from tokensvc.config import Rate
from tokensvc_client.peer import certificate_thumbprint
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import b64url_decode

LOGIN = "spiffe://tokensvc.test/ns/auth/sa/login"
ORDERS = "spiffe://tokensvc.test/ns/shop/sa/orders"
POLICY = f'[rpc.Issue]\nallow = ["{LOGIN}", "{ORDERS}"]\n'


def _cnf(access_token: str) -> dict:
    return json.loads(b64url_decode(access_token.split(".")[1])).get("cnf", {})


def test_a_workload_binds_its_tokens_to_its_own_certificate(mtls_service, dev_pki):
    svc = mtls_service(POLICY)
    orders, billing = svc.stub("orders"), svc.stub("billing")
    thumb = certificate_thumbprint(dev_pki["orders"].cert.read_bytes())
    pair = orders.Issue(
        pb.IssueRequest(subject="orders-svc", bind_to_client_certificate=True)
    ).tokens
    assert _cnf(pair.access_token) == {"x5t#S256": thumb}
    seen = billing.Introspect(pb.IntrospectRequest(token=pair.access_token))
    assert seen.active and seen.cnf_x5t_s256 == thumb
    # a bound refresh token introspects active only for the workload holding it
    own = orders.Introspect(pb.IntrospectRequest(token=pair.refresh_token))
    assert own.active and own.cnf_x5t_s256 == thumb and own.subject == "orders-svc"
    assert billing.Introspect(pb.IntrospectRequest(token=pair.refresh_token)) == (
        pb.IntrospectResponse(active=False)
    )

    # a thief with another certificate gets nothing, and the family is untouched
    stolen = pb.RefreshRequest(refresh_token=pair.refresh_token)
    err = refused(lambda: billing.Refresh(stolen))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "certificate_mismatch"
    new = orders.Refresh(stolen).tokens
    assert _cnf(new.access_token) == {"x5t#S256": thumb}  # binding survives rotation
    assert orders.Refresh(pb.RefreshRequest(refresh_token=new.refresh_token)).tokens


def test_a_login_service_binds_tokens_to_another_workloads_certificate(mtls_service, dev_pki):
    svc = mtls_service(POLICY)
    thumb = certificate_thumbprint(dev_pki["billing"].cert.read_bytes())
    pair = svc.stub("login").Issue(pb.IssueRequest(subject="bob", cnf_x5t_s256=thumb)).tokens
    assert _cnf(pair.access_token) == {"x5t#S256": thumb}
    refresh = pb.RefreshRequest(refresh_token=pair.refresh_token)
    assert refused(lambda: svc.stub("login").Refresh(refresh)).details() == "certificate_mismatch"
    assert svc.stub("billing").Refresh(refresh).tokens


def test_unbound_tokens_refresh_from_anywhere(mtls_service):
    svc = mtls_service(POLICY)
    pair = svc.stub("login").Issue(pb.IssueRequest(subject="carol")).tokens
    assert "cnf" not in json.loads(b64url_decode(pair.access_token.split(".")[1]))
    assert svc.stub("billing").Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))


@pytest.mark.parametrize(
    "request_",
    [
        pb.IssueRequest(subject="a", cnf_x5t_s256="not-a-thumbprint"),
        pb.IssueRequest(subject="a", cnf_x5t_s256="A" * 44),
        pb.IssueRequest(subject="a", cnf_x5t_s256="A" * 42 + "B"),  # non-canonical
        pb.IssueRequest(subject="a", cnf_x5t_s256="A" * 43, bind_to_client_certificate=True),
    ],
)
def test_bad_binding_requests_are_invalid_arguments(mtls_service, request_):
    login = mtls_service(POLICY).stub("login")
    assert refused(lambda: login.Issue(request_)).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_binding_to_the_caller_needs_a_client_certificate(stub):
    # plaintext development mode: there is no certificate to bind to
    err = refused(lambda: stub.Issue(pb.IssueRequest(subject="a", bind_to_client_certificate=True)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bound_refresh_token_is_inactive_for_every_other_caller(mtls_service, dev_pki):
    svc = mtls_service(POLICY)
    thumb = certificate_thumbprint(dev_pki["billing"].cert.read_bytes())
    pair = svc.stub("login").Issue(pb.IssueRequest(subject="bob", cnf_x5t_s256=thumb)).tokens
    token = pb.IntrospectRequest(token=pair.refresh_token)
    for other in ("login", "orders", "admin"):  # its issuer too: RFC 7662 per caller
        assert svc.stub(other).Introspect(token) == pb.IntrospectResponse(active=False), other
    seen = svc.stub("billing").Introspect(token)
    assert seen.active and seen.token_type == "refresh" and seen.subject == "bob"
    # the bound access token stays introspectable by resource servers
    assert svc.stub("orders").Introspect(pb.IntrospectRequest(token=pair.access_token)).active
    unbound = svc.stub("login").Issue(pb.IssueRequest(subject="carol")).tokens
    assert svc.stub("orders").Introspect(pb.IntrospectRequest(token=unbound.refresh_token)).active


def test_a_thief_of_bound_tokens_is_limited_and_cannot_lock_their_holder_out(mtls_service):
    # a certificate mismatch is the presenting workload's own failure: it counts against
    # that peer, never against the session or subject the stolen token belongs to
    svc = mtls_service(POLICY, rate_auth_failures=Rate(3, 60))
    orders, billing, login = svc.stub("orders"), svc.stub("billing"), svc.stub("login")
    request = pb.IssueRequest(
        subject="orders-svc", bind_to_client_certificate=True, audience=["mesh", "tokensvc"]
    )
    pair = orders.Issue(request).tokens
    stolen = pb.RefreshRequest(refresh_token=pair.refresh_token)
    listing = pb.ListSessionsRequest(subject="orders-svc")
    bearer = (("authorization", f"Bearer {pair.access_token}"),)
    for _ in range(4):  # the 4th failure is over the burst of 3
        assert refused(lambda: billing.Refresh(stolen)).details() == "certificate_mismatch"
        assert refused(lambda: login.ListSessions(listing, metadata=bearer)).details() == (
            "certificate_mismatch"
        )
    # the thieves are limited, as the peers they are
    assert refused(lambda: billing.Refresh(stolen)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused(lambda: login.ListSessions(listing, metadata=bearer)).code() == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # the holder lists and refreshes as usual
    assert orders.ListSessions(listing, metadata=bearer).sessions
    assert orders.Refresh(stolen).tokens
