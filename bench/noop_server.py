"""A no-op unary gRPC server on the same stack as tokensvc (grpc.aio): the framework ceiling.

``python -m bench.noop_server PORT [--protected ISSUER AUDIENCE TOKENSVC_TARGET]``: with
--protected, the AuthInterceptor of the client library guards the method.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
import grpc.aio

METHOD = "/bench.Noop/Call"


async def _noop(request: bytes, context: Any) -> bytes:
    return b""


async def serve(port: int, protect: list[str]) -> None:
    interceptors: list[Any] = []
    if protect:  # built inside the running loop: grpc.aio channels belong to one loop
        from bench.protect import interceptor

        interceptors.append(interceptor(issuer=protect[0], audience=protect[1], target=protect[2]))
    server = grpc.aio.server(interceptors=interceptors)
    handler = grpc.unary_unary_rpc_method_handler(_noop)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Noop", {"Call": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def main(argv: list[str]) -> None:
    protect = argv[2:5] if len(argv) > 1 and argv[1] == "--protected" else []
    asyncio.run(serve(int(argv[0]), protect))


if __name__ == "__main__":
    main(sys.argv[1:])
