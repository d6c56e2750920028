"""A protected gRPC service for the web example: ``demo.Profile/WhoAmI`` behind the client
library's ``AioAuthInterceptor``, answering JSON bytes (no .proto needed).

The web backend calls it with the user's access token
(``tokensvc_client.web.session_call_credentials()``), exactly as any service of the mesh
would be called.
"""

from __future__ import annotations

import json

import grpc
import grpc.aio

from tokensvc_client import AioAuthInterceptor, AsyncJwksCache, AsyncTokenClient, current_claims

SERVICE = "demo.Profile"
METHOD = f"/{SERVICE}/WhoAmI"
AUDIENCE = "demo-profile"


async def _who_am_i(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    claims = current_claims()  # verified by the interceptor
    return json.dumps(
        {"subject": claims.subject, "roles": list(claims.roles), "session": claims.session_id}
    ).encode()


async def start(tokens: AsyncTokenClient, issuer: str) -> tuple[grpc.aio.Server, str]:
    """Serve the profile service on a free loopback port; returns it and its target."""
    interceptor = AioAuthInterceptor(
        AsyncJwksCache(tokens.get_keys), issuer=issuer, audience=AUDIENCE
    )
    server = grpc.aio.server(interceptors=[interceptor])
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"WhoAmI": grpc.unary_unary_rpc_method_handler(_who_am_i)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def who_am_i(target: str, call_credentials: grpc.CallCredentials) -> dict[str, object]:
    """Call the service as the user of ``call_credentials`` (plaintext loopback: gRPC local
    credentials, which carry call credentials)."""
    creds = grpc.composite_channel_credentials(grpc.local_channel_credentials(), call_credentials)
    async with grpc.aio.secure_channel(target, creds) as channel:
        reply = await channel.unary_unary(METHOD)(b"", timeout=5)
    result: dict[str, object] = json.loads(reply)
    return result
