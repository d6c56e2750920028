"""Certificate-bound access tokens (RFC 8705) in AuthInterceptor and AioAuthInterceptor,
end to end over mutual TLS; and the client methods of the binding and locking RPC fields.

The sample service serves mTLS with the development PKI's server certificate; workloads
"orders" and "billing" call it with their own client certificates. Tokens are issued by
the real tokensvc with ``cnf_x5t_s256`` set to a certificate's thumbprint.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tests.client.conftest import METHODS, bearer
from tokensvc.cli.devcerts import DEFAULT_WORKLOADS, DevCA, Issued
from tokensvc_client import AsyncTokenClient, PermissionDenied
from tokensvc_client.peer import certificate_thumbprint

SERVERS = ["sync", "aio"]
MISMATCH = (grpc.StatusCode.UNAUTHENTICATED, "invalid token: certificate_mismatch")
UNBOUND = (grpc.StatusCode.UNAUTHENTICATED, "invalid token: unbound")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    ca = DevCA(tmp_path_factory.mktemp("pki"))
    orders, billing = DEFAULT_WORKLOADS["orders"], DEFAULT_WORKLOADS["billing"]
    return {
        "server": ca.issue("server", hosts=("localhost", "127.0.0.1"), server=True),
        "orders": ca.issue("orders", spiffe_id=orders),
        "billing": ca.issue("billing", spiffe_id=billing),
        # two URI SANs: no identity and, as if there were no certificate, no thumbprint
        # either (tokensvc_client.peer), so it proves no binding
        "ambiguous": ca.issue("ambiguous", spiffe_id=orders, uris=(billing,)),
    }


def _mtls_server(pki: dict[str, Issued]) -> grpc.ServerCredentials:
    server = pki["server"]
    return grpc.ssl_server_credentials(
        [(server.key.read_bytes(), server.cert.read_bytes())],
        root_certificates=server.ca.read_bytes(),
        require_client_auth=True,
    )


def _as(pki: dict[str, Issued], workload: str) -> grpc.ChannelCredentials:
    issued = pki[workload]
    return grpc.ssl_channel_credentials(
        root_certificates=issued.ca.read_bytes(),
        private_key=issued.key.read_bytes(),
        certificate_chain=issued.cert.read_bytes(),
    )


def _thumbprint(issued: Issued) -> str:
    return certificate_thumbprint(issued.cert.read_bytes())


def _rejected(protected, kind: str, token: str, channel: grpc.Channel | None = None):
    with pytest.raises(grpc.RpcError) as err:
        protected.call(kind, bearer(token), channel)
    return err.value.code(), err.value.details()


@pytest.mark.parametrize("server", SERVERS)
def test_bound_token_is_accepted_only_from_its_certificate(
    tokensvc, client, make_protected, pki, server
):
    protected = make_protected(tokensvc, server, server_credentials=_mtls_server(pki))
    orders = protected.secure_channel(_as(pki, "orders"))
    billing = protected.secure_channel(_as(pki, "billing"))
    token = client.issue("svc-orders", cnf_x5t_s256=_thumbprint(pki["orders"])).access_token
    # first call on a cold key cache (the blocking interceptor decides in the handler's
    # thread then), the others from the cache
    assert protected.call("unary_unary", bearer(token), orders)[0]["sub"] == "svc-orders"
    for kind in METHODS:
        seen = protected.call(kind, bearer(token), orders)
        assert seen and all(s["sub"] == "svc-orders" for s in seen), kind
    handled = len(protected.calls)
    for kind in METHODS:
        assert _rejected(protected, kind, token, billing) == MISMATCH, kind
    assert len(protected.calls) == handled  # no handler ran for billing


@pytest.mark.parametrize("server", SERVERS)
def test_a_certificate_refused_as_ambiguous_proves_no_binding(
    tokensvc, client, make_protected, pki, server
):
    protected = make_protected(tokensvc, server, server_credentials=_mtls_server(pki))
    ambiguous = protected.secure_channel(_as(pki, "ambiguous"))
    token = client.issue("svc-orders", cnf_x5t_s256=_thumbprint(pki["ambiguous"])).access_token
    assert _rejected(protected, "unary_unary", token, ambiguous) == MISMATCH
    assert protected.calls == []


@pytest.mark.parametrize("server", SERVERS)
def test_bound_token_replayed_first_on_a_cold_cache_is_refused(
    tokensvc, client, make_protected, pki, server
):
    protected = make_protected(tokensvc, server, server_credentials=_mtls_server(pki))
    billing = protected.secure_channel(_as(pki, "billing"))
    token = client.issue("svc-orders", cnf_x5t_s256=_thumbprint(pki["orders"])).access_token
    assert _rejected(protected, "unary_stream", token, billing) == MISMATCH
    assert _rejected(protected, "unary_unary", token, billing) == MISMATCH
    assert protected.calls == []
    assert len(protected.fetches) == 1


@pytest.mark.parametrize("server", SERVERS)
def test_bound_token_without_a_client_certificate_is_refused(
    tokensvc, client, make_protected, pki, server
):
    protected = make_protected(tokensvc, server)  # plaintext: no certificate at all
    bound = client.issue("svc-orders", cnf_x5t_s256=_thumbprint(pki["orders"])).access_token
    unbound = client.issue("svc-orders").access_token
    assert _rejected(protected, "unary_unary", bound) == MISMATCH
    assert protected.call("unary_unary", bearer(unbound))[0]["sub"] == "svc-orders"


@pytest.mark.parametrize("server", SERVERS)
def test_unbound_tokens_work_over_mtls_unless_binding_is_required(
    tokensvc, client, make_protected, pki, server
):
    unbound = client.issue("svc-orders").access_token
    bound = client.issue("svc-orders", cnf_x5t_s256=_thumbprint(pki["orders"])).access_token
    lenient = make_protected(tokensvc, server, server_credentials=_mtls_server(pki))
    assert lenient.call("unary_unary", bearer(unbound), lenient.secure_channel(_as(pki, "orders")))

    strict = make_protected(
        tokensvc, server, server_credentials=_mtls_server(pki), require_binding=True
    )
    orders = strict.secure_channel(_as(pki, "orders"))
    for kind in METHODS:
        assert _rejected(strict, kind, unbound, orders) == UNBOUND, kind
    assert strict.calls == []
    assert strict.call("stream_stream", bearer(bound), orders)[0]["sub"] == "svc-orders"
    billing = strict.secure_channel(_as(pki, "billing"))
    assert _rejected(strict, "unary_unary", bound, billing) == MISMATCH


def test_introspection_shows_the_binding(tokensvc, client, pki):
    thumbprint = _thumbprint(pki["orders"])
    pair = client.issue("svc-orders", cnf_x5t_s256=thumbprint)
    assert client.introspect(pair.access_token).cnf_x5t_s256 == thumbprint
    assert client.introspect(client.issue("svc-orders").access_token).cnf_x5t_s256 == ""


def test_asyncio_client_issues_bound_tokens_and_locks_subjects(tokensvc, pki, client):
    thumbprint = _thumbprint(pki["billing"])

    async def scenario() -> tuple[str, int, bool, bool]:
        async with AsyncTokenClient(tokensvc.target, insecure=True) as aclient:
            pair = await aclient.issue("svc-billing", cnf_x5t_s256=thumbprint)
            cnf = (await aclient.introspect(pair.access_token)).cnf_x5t_s256
            revoked = await aclient.lock_subject("svc-billing", reason="key leaked")
            with pytest.raises(PermissionDenied):
                await aclient.issue("svc-billing")
            was_locked = await aclient.unlock_subject("svc-billing")
            again = await aclient.unlock_subject("svc-billing")
            await aclient.issue("svc-billing")
            return cnf, revoked, was_locked, again

    cnf, revoked, was_locked, again = asyncio.run(scenario())
    assert cnf == thumbprint
    assert (revoked, was_locked, again) == (1, True, False)


def test_lock_subject_revokes_its_sessions_until_unlocked(tokensvc, client):
    first = client.issue("eve")
    client.issue("eve")
    other = client.issue("frank")
    assert client.lock_subject("eve", reason="compromised") == 2
    assert not client.introspect(first.access_token).active
    assert client.introspect(other.access_token).active
    with pytest.raises(PermissionDenied):
        client.issue("eve")
    assert client.unlock_subject("eve") is True
    assert client.unlock_subject("eve") is False
    assert client.introspect(client.issue("eve").access_token).active
    assert not client.introspect(first.access_token).active  # revoked sessions stay revoked
