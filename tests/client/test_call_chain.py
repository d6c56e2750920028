"""A three-hop call chain through real services over mTLS (docs/call-chains.md):
edge (gateway) -> A (orders) -> B (billing), sync and asyncio interceptors alike.

The edge mints a Transaction Token and exchanges the user's access token for A; A's handler
exchanges the token it received for B and calls B through a channel with the
TransactionPropagator (no Transaction Token code of its own); B sees the user, the
transaction, the requesting workload and the actor chain. Then the refusals at the
interceptors: down-scoped tokens, tokens of the wrong kind, a revoked session (through the
revocation feed), an expired or foreign Transaction Token, a missing one, an actor chain
the method does not accept.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.support import wait_until
from tests.support.chains import BILLING, DOMAIN, GATEWAY, ORDERS, POLICY, write_chain_pki
from tests.support.protected import Setup, start_server
from tokensvc_client import (
    FEED_CHANNEL_OPTIONS,
    ActorChain,
    AsyncTokenClient,
    RevocationFeed,
    TokenClient,
    TransactionPropagator,
    aio_transaction_propagators,
    channel,
    channel_credentials,
    current_access_token,
    current_claims,
    current_transaction,
    sending_txn_token,
)
from tokensvc_client.v1 import tokensvc_pb2 as pb

B_METHOD = "/chain.B/Get"
A_METHOD = "/chain.A/Get"


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory):
    return write_chain_pki(tmp_path_factory.mktemp("chain-pki"))


def _seen_by_b() -> bytes:
    claims, txn = current_claims(), current_transaction()
    return json.dumps(
        {
            "sub": claims.subject,
            "actors": list(claims.actors),
            "roles": list(claims.roles),
            "txn": txn.transaction_id,
            "txn_sub": txn.subject,
            "req_wl": txn.requesting_workload,
            "scope": list(txn.scope),
            "tctx": dict(txn.context),
        }
    ).encode()


def _b_handler(kind: str) -> grpc.GenericRpcHandler:
    if kind == "sync":

        def get(request: bytes, context: Any) -> bytes:
            return _seen_by_b()

    else:

        async def get(request: bytes, context: Any) -> bytes:  # type: ignore[misc]
            return _seen_by_b()

    return grpc.method_handlers_generic_handler(
        "chain.B", {"Get": grpc.unary_unary_rpc_method_handler(get)}
    )


@dataclass
class Chain:
    """The running chain: tokensvc, A, B, and the edge's clients."""

    svc: Any
    a: str
    b: str
    pki: dict

    def client(self, workload: str) -> TokenClient:
        mine = self.pki[workload]
        return TokenClient(self.svc.target, ca=self.pki["server"].ca, cert=mine.cert, key=mine.key)

    def hop(self, target: str, workload: str = "gateway") -> grpc.Channel:
        """A channel to a hop presenting ``workload``'s certificate, propagating txn-tokens."""
        mine = self.pki[workload]
        plain = channel(target, ca=self.pki["server"].ca, cert=mine.cert, key=mine.key)
        return grpc.intercept_channel(plain, TransactionPropagator())


def _tls(pki: dict) -> dict[str, Any]:
    return {"ca": pki["server"].ca, "cert": pki["orders"].cert, "key": pki["orders"].key}


@pytest.fixture(params=["sync", "aio"])
def chain(request, mtls_service, dev_pki) -> Iterator[Chain]:
    kind = request.param
    svc = mtls_service(POLICY, trust_domain=DOMAIN)
    pki = dev_pki
    server_creds = grpc.ssl_server_credentials(
        [(pki["server"].key.read_bytes(), pki["server"].cert.read_bytes())],
        root_certificates=pki["server"].ca.read_bytes(),
        require_client_auth=True,
    )
    feed_channel = channel(
        svc.target, ca=pki["server"].ca, cert=pki["billing"].cert, key=pki["billing"].key,
        options=FEED_CHANNEL_OPTIONS,
    )  # fmt: skip
    feed = RevocationFeed(feed_channel).start()
    assert feed.wait_connected(15)
    common = {"trust_domain": DOMAIN, "revocation_check": feed}
    b_target, stop_b = start_server(
        svc.server,
        kind,
        Setup(
            _b_handler(kind),
            [],
            interceptor_kw={
                "audience": "billing",
                "require_txn_token": ["/chain.B/"],
                "actor_chains": {"/chain.B/": ActorChain(min_depth=1)},
                **common,
            },
            credentials=server_creds,
            client_kw=_tls(pki),
        ),
    )
    a_target, stop_a = start_server(
        svc.server,
        kind,
        Setup(
            _a_handler(kind, svc.target, b_target, pki),
            [],
            interceptor_kw={"audience": "orders", **common},
            credentials=server_creds,
            client_kw=_tls(pki),
        ),
    )
    yield Chain(svc, a_target, b_target, pki)
    stop_a()
    stop_b()
    feed.close()
    feed_channel.close()
    # the client metrics report the least connected live feed: let this one go now
    del stop_a, stop_b, feed, common
    gc.collect()


def _a_handler(kind: str, tokensvc: str, b_target: str, pki: dict) -> grpc.GenericRpcHandler:
    """A: exchange the inbound token for B, call B; no Transaction Token code."""
    tls = _tls(pki)
    if kind == "sync":
        client = TokenClient(tokensvc, **tls)
        b = grpc.intercept_channel(channel(b_target, **tls), TransactionPropagator())
        call_b = b.unary_unary(B_METHOD)

        def get(request: bytes, context: Any) -> bytes:
            token = client.exchange(current_access_token(), ["billing"]).access_token
            return call_b(request, metadata=[("authorization", f"Bearer {token}")])

    else:
        held: dict[str, Any] = {}

        async def get(request: bytes, context: Any) -> bytes:  # type: ignore[misc]
            if not held:  # created on the server's own loop
                held["client"] = AsyncTokenClient(tokensvc, **tls)
                held["b"] = grpc.aio.secure_channel(
                    b_target, channel_credentials(**tls), interceptors=aio_transaction_propagators()
                )
            exchanged = await held["client"].exchange(current_access_token(), ["billing"])
            call_b = held["b"].unary_unary(B_METHOD)
            metadata = (("authorization", f"Bearer {exchanged.access_token}"),)
            return await call_b(request, metadata=metadata)

    return grpc.method_handlers_generic_handler(
        "chain.A", {"Get": grpc.unary_unary_rpc_method_handler(get)}
    )


def _edge(chain: Chain, subject: str = "alice", scope=("orders:read",)):
    """The edge's work: a user's token, a Transaction Token, a token for A."""
    user = chain.client("login").issue(
        subject, roles=["orders:read", "billing:read", "orders:write"], audience=["shop"]
    )
    gateway = chain.client("gateway")
    txn = gateway.mint_transaction_token(
        user.access_token, list(scope), request_details={"order": 42}
    )
    for_a = gateway.exchange(user.access_token, ["orders"], roles=["orders:read"])
    return user, txn, for_a


def _call(target_channel: grpc.Channel, method: str, token: str, txn: str | None = None) -> dict:
    metadata = [("authorization", f"Bearer {token}")]
    if txn is not None:
        metadata.append(("txn-token", txn))
    return json.loads(target_channel.unary_unary(method)(b"x", metadata=metadata, timeout=15))


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_b_sees_the_user_the_transaction_and_the_actor_chain(chain):
    _user, txn, for_a = _edge(chain)
    a = chain.hop(chain.a)
    with sending_txn_token(txn.txn_token):  # the edge minted it: the propagator sends it
        seen = json.loads(
            a.unary_unary(A_METHOD)(
                b"x", metadata=[("authorization", f"Bearer {for_a.access_token}")], timeout=15
            )
        )
    assert seen == {
        "sub": "alice",
        "actors": [ORDERS, GATEWAY],
        "roles": ["orders:read"],  # down-scoped at the edge, kept by A's exchange
        "txn": txn.txn,
        "txn_sub": "alice",
        "req_wl": GATEWAY,
        "scope": ["orders:read"],
        "tctx": {"order": 42},
    }


def test_tokens_of_the_wrong_kind_are_refused_at_the_interceptor(chain):
    _user, txn, for_a = _edge(chain)
    b = chain.hop(chain.b, "orders")
    for_b = chain.client("orders").exchange(for_a.access_token, ["billing"]).access_token
    assert _call(b, B_METHOD, for_b, txn.txn_token)["txn"] == txn.txn
    # a Transaction Token replayed as an access token, and the other way round
    err = _refused(lambda: _call(b, B_METHOD, txn.txn_token, txn.txn_token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "invalid token: bad_type"
    err = _refused(lambda: _call(b, B_METHOD, for_b, for_b))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "invalid txn-token: bad_type"
    # B requires a Transaction Token and an exchanged access token
    err = _refused(lambda: _call(b, B_METHOD, for_b))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "invalid txn-token: missing_token"
    direct = chain.client("login").issue("alice", audience=["billing"]).access_token
    err = _refused(lambda: _call(b, B_METHOD, direct, txn.txn_token))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "actor chain not accepted"
    # an access token for A is not one for B: each hop down-scopes the audience
    err = _refused(lambda: _call(b, B_METHOD, for_a.access_token, txn.txn_token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "invalid token: wrong_audience"


def test_a_narrower_replacement_travels_down_the_chain(chain):
    _user, txn, for_a = _edge(chain, scope=("orders:read", "billing:read"))
    narrower = chain.client("orders").mint_transaction_token(
        txn.txn_token, ["billing:read"], replace=True
    )
    for_b = chain.client("orders").exchange(for_a.access_token, ["billing"]).access_token
    seen = _call(chain.hop(chain.b, "orders"), B_METHOD, for_b, narrower.txn_token)
    assert seen["txn"] == txn.txn and seen["scope"] == ["billing:read"]
    assert seen["req_wl"] == ORDERS and seen["tctx"] == {"order": 42}


def test_revoking_the_session_ends_the_chains_tokens_at_the_interceptors(chain):
    user, txn, for_a = _edge(chain)
    for_b = chain.client("orders").exchange(for_a.access_token, ["billing"]).access_token
    # a workload's own session carries the same Transaction Token to B below
    own = chain.client("login").issue(BILLING, audience=["orders"]).access_token
    own_for_b = chain.client("orders").exchange(own, ["billing"]).access_token
    b = chain.hop(chain.b, "orders")
    assert _call(b, B_METHOD, own_for_b, txn.txn_token)["sub"] == BILLING
    chain.client("login").revoke(session_id=user.session_id)

    def refused(token: str, txn_token: str) -> str | None:
        try:
            _call(b, B_METHOD, token, txn_token)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return err.details()
        return None

    # within the feed's bound (a wait, not a sleep): the exchanged access token ...
    assert wait_until(lambda: refused(for_b, txn.txn_token), 10) == "invalid token: revoked"
    # ... and the Transaction Token of the revoked session, even beside a live access token
    assert refused(own_for_b, txn.txn_token) == "invalid txn-token: revoked"


def test_expired_and_foreign_transaction_tokens_are_refused(chain, mtls_service):
    user, _, for_a = _edge(chain)
    for_b = chain.client("orders").exchange(for_a.access_token, ["billing"]).access_token
    short = chain.client("gateway").mint_transaction_token(
        user.access_token, ["orders:read"], lifetime_seconds=1
    )
    b = chain.hop(chain.b, "orders")

    def expired() -> bool:
        try:
            _call(b, B_METHOD, for_b, short.txn_token)
        except grpc.RpcError as err:
            return err.details() == "invalid txn-token: expired"
        return False

    wait_until(expired, 10, what="the 1-second Transaction Token to expire")
    # signed by the same key ring for another trust domain
    other = mtls_service(POLICY, trust_domain="elsewhere.test")
    foreign = other.stub("gateway").MintTransactionToken(
        pb.MintTransactionTokenRequest(subject_token=user.access_token, scope=["orders:read"])
    )
    err = _refused(lambda: _call(b, B_METHOD, for_b, foreign.txn_token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "invalid txn-token: wrong_audience"
