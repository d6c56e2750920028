"""Status codes as the client library reports them: CANCELLED from the far side is
retryable like UNAVAILABLE (a stopping server or a proxy ended the call)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from tokensvc_client import TokenClient, Unavailable


@pytest.fixture
def cancelling_server():
    """A real gRPC server on loopback whose Introspect ends every call CANCELLED."""

    def cancel(_request, context):
        context.abort(grpc.StatusCode.CANCELLED, "server going away")

    handler = grpc.method_handlers_generic_handler(
        "tokensvc.v1.TokenService",
        {"Introspect": grpc.unary_unary_rpc_method_handler(cancel, lambda b: b, lambda b: b)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_cancelled_by_the_server_is_unavailable(cancelling_server):
    tokens = TokenClient(cancelling_server, insecure=True)
    with tokens, pytest.raises(Unavailable) as err:
        tokens.introspect("x")
    assert err.value.code == grpc.StatusCode.CANCELLED
