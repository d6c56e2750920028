"""A call chain: an edge service and two hops, with token exchange and a Transaction Token
(docs/call-chains.md) as one complete program.

- The **edge** (an API gateway) receives alice's access token. It mints a Transaction Token
  for the request (its purpose, the order, the client's address) and exchanges alice's
  token for one addressed to ``orders``, then calls ``orders``.
- **orders** (hop A) exchanges the token it received for one addressed to ``billing`` and
  calls ``billing``. It has no Transaction Token code: its interceptor verified the inbound
  ``txn-token`` and the channel's ``TransactionPropagator`` forwards it.
- **billing** (hop B) requires a Transaction Token and an exchanged access token; it sees
  the user, the transaction, the requesting workload and the actor chain.

Run it against ``make run`` (plaintext development mode on 127.0.0.1:50051, where callers
have no mTLS identity: the workloads show up as ``insecure:127.0.0.1``)::

    python examples/call_chain.py            # or: TOKENSVC=host:port
"""

from __future__ import annotations

import json
import os
import time
from concurrent import futures

import grpc

from tokensvc_client import (
    FEED_CHANNEL_OPTIONS,
    ActorChain,
    AuthInterceptor,
    JwksCache,
    RevocationFeed,
    RpcFailed,
    TokenClient,
    TransactionPropagator,
    channel,
    current_access_token,
    current_claims,
    current_transaction,
    sending_txn_token,
)

TOKENSVC = os.environ.get("TOKENSVC", "127.0.0.1:50051")
ISSUER = os.environ.get("TOKENSVC_ISSUER", "https://tokensvc.local")
TRUST_DOMAIN = os.environ.get("TOKENSVC_TRUST_DOMAIN", "tokensvc.local")

tokens = TokenClient(TOKENSVC, insecure=True)


def billing_get(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Hop B: what it knows about the call, from the verified tokens alone."""
    claims, txn = current_claims(), current_transaction()
    return json.dumps(
        {
            "sub": txn.subject,
            "txn": txn.transaction_id,
            "req_wl": txn.requesting_workload,
            "scope": " ".join(txn.scope),
            "tctx": dict(txn.context),
            "actors": list(claims.actors),  # who exchanged the access token, latest first
        }
    ).encode()


def orders_get(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Hop A: exchange the token it received for billing's, call billing."""
    try:
        for_billing = tokens.exchange(current_access_token(), ["billing"])
    except RpcFailed as err:  # e.g. the session was revoked a moment ago
        context.abort(err.code, "exchange refused")
    bearer = [("authorization", f"Bearer {for_billing.access_token}")]
    return BILLING(request, metadata=bearer, timeout=5)  # txn-token added by the channel


def serve(name: str, audience: str, method: grpc.RpcMethodHandler, **auth: object) -> int:
    """One hop behind the interceptor: access token for ``audience``, Transaction Tokens
    of our trust domain, revocations from the feed."""
    server = grpc.server(
        futures.ThreadPoolExecutor(8),
        interceptors=[
            AuthInterceptor(
                JwksCache(tokens.get_keys),
                issuer=ISSUER,
                audience=audience,
                trust_domain=TRUST_DOMAIN,
                revocation_check=FEED,
                **auth,  # type: ignore[arg-type]
            )
        ],
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, {"Get": method})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    SERVERS.append(server)
    return port


FEED = RevocationFeed(channel(TOKENSVC, insecure=True, options=FEED_CHANNEL_OPTIONS)).start()
SERVERS: list[grpc.Server] = []
billing_port = serve(
    "shop.Billing",
    "billing",
    grpc.unary_unary_rpc_method_handler(billing_get),
    require_txn_token=["/shop.Billing/"],  # no transaction, no call
    actor_chains={"/shop.Billing/": ActorChain(min_depth=1)},  # only through another hop
)
BILLING = grpc.intercept_channel(
    channel(f"127.0.0.1:{billing_port}", insecure=True), TransactionPropagator()
).unary_unary("/shop.Billing/Get")
orders_port = serve("shop.Orders", "orders", grpc.unary_unary_rpc_method_handler(orders_get))


def edge() -> None:
    """The edge: what an API gateway does with alice's request for order 42."""
    # the login service's part: alice's token, for the shop's front door
    alice = tokens.issue("alice", roles=["orders:read", "orders:write"], audience=["shop"])
    txn = tokens.mint_transaction_token(
        alice.access_token,
        ["orders:read"],  # the purpose of this transaction, no more
        request_details={"order": "42"},  # immutable down the chain (tctx)
        request_context={"req_ip": "203.0.113.7"},  # where the request came from (rctx)
    )
    for_orders = tokens.exchange(alice.access_token, ["orders"], roles=["orders:read"])
    orders = grpc.intercept_channel(
        channel(f"127.0.0.1:{orders_port}", insecure=True), TransactionPropagator()
    ).unary_unary("/shop.Orders/Get")
    bearer = [("authorization", f"Bearer {for_orders.access_token}")]
    with sending_txn_token(txn.txn_token):  # the edge minted it: send it along
        seen = json.loads(orders(b"42", metadata=bearer, timeout=5))
    print(f"billing saw {seen['sub']} with scope {seen['scope']} and tctx {seen['tctx']}")
    print(f"in the edge's transaction: {seen['txn'] == txn.txn}, requested by {seen['req_wl']}")
    print(f"through {len(seen['actors'])} exchanges: {' <- '.join(seen['actors'])}")

    tokens.revoke(session_id=alice.session_id, reason="example")
    deadline = time.monotonic() + 5  # the feed delivers the revocation in milliseconds
    while time.monotonic() < deadline:
        try:
            with sending_txn_token(txn.txn_token):
                orders(b"43", metadata=bearer, timeout=5)
        except grpc.RpcError as err:
            # the interceptor (once the feed has it) or tokensvc itself (before) refuses
            print("after revoking the session:", err.code().name)  # UNAUTHENTICATED
            break
        time.sleep(0.01)


def main() -> None:
    try:
        edge()
    finally:
        for server in SERVERS:
            server.stop(None)
        FEED.close()
        tokens.close()


if __name__ == "__main__":
    main()
