"""A service protected by tokensvc, and a caller of it: the interceptor, revocation feed and
call-credentials examples of README.md and docs/client.md as one complete program.

The protected service ``shop.Orders/Get`` takes and returns bytes (no generated code, to
keep the example to the point; with a .proto your servicer looks the same). Every call
needs a valid access token for audience ``orders``; a revoked one is refused within
milliseconds thanks to the revocation feed.

Run it against ``make run`` (plaintext development mode on 127.0.0.1:50051)::

    python examples/protected_service.py            # or: TOKENSVC=host:port
"""

from __future__ import annotations

import os
import time
from concurrent import futures

import grpc

from tokensvc_client import (
    FEED_CHANNEL_OPTIONS,
    AuthInterceptor,
    JwksCache,
    RevocationFeed,
    TokenClient,
    channel,
    current_claims,
    token_call_credentials,
)

TOKENSVC = os.environ.get("TOKENSVC", "127.0.0.1:50051")
ISSUER = os.environ.get("TOKENSVC_ISSUER", "https://tokensvc.local")


def get_order(request: bytes, context: grpc.ServicerContext) -> bytes:
    claims = current_claims()  # verified: claims.subject, claims.roles, ...
    return f"order {request.decode()} of {claims.subject}".encode()


def serve() -> tuple[grpc.Server, int, RevocationFeed]:
    """The protected service on a free loopback port."""
    keys = JwksCache(TokenClient(TOKENSVC, insecure=True).get_keys)  # cached max_age_seconds
    feed = RevocationFeed(channel(TOKENSVC, insecure=True, options=FEED_CHANNEL_OPTIONS)).start()
    server = grpc.server(
        futures.ThreadPoolExecutor(16),
        interceptors=[
            AuthInterceptor(keys, issuer=ISSUER, audience="orders", revocation_check=feed)
        ],
    )
    orders = {"Get": grpc.unary_unary_rpc_method_handler(get_order)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("shop.Orders", orders)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, feed


def main() -> None:
    server, port, feed = serve()
    tokens = TokenClient(TOKENSVC, insecure=True)
    # the login service's part: a token pair for alice, for the orders service
    pair = tokens.issue("alice", audience=["orders"])
    # the caller: tokens attached to every call, refreshed before they expire
    creds = token_call_credentials(pair, tokens.refresh, on_refresh=lambda new: None)
    with channel(f"127.0.0.1:{port}", insecure=True, call_credentials=creds) as orders:
        get = orders.unary_unary("/shop.Orders/Get")
        print(get(b"42", timeout=5).decode())  # order 42 of alice
        tokens.revoke(session_id=pair.session_id, reason="example")
        deadline = time.monotonic() + 5  # the feed delivers the revocation in milliseconds
        while time.monotonic() < deadline:
            try:
                get(b"43", timeout=5)
            except grpc.RpcError as err:
                print(err.code().name, err.details())  # UNAUTHENTICATED invalid token: revoked
                break
            time.sleep(0.01)
    feed.close()
    tokens.close()
    server.stop(None)


if __name__ == "__main__":
    main()
