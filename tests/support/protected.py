"""A gRPC service behind the client library's interceptors, on loopback, for the tests.

:func:`start_server` serves a generic handler either on a blocking ``grpc.server`` with
:class:`AuthInterceptor` ("sync") or on a ``grpc.aio`` server on its own event loop thread
with :class:`AioAuthInterceptor` ("aio"). The interceptor's JWKS cache fetches keys from
the real tokensvc through ``TokenClient.get_keys`` / ``AsyncTokenClient.get_keys``, wrapped
only to record the name of the thread of each fetch. What the suites vary -- the handler,
server options and credentials, the cache's and the interceptor's settings -- are its
parameters.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health, health_pb2_grpc

from tests.support import ServerThread
from tokensvc_client import (
    AioAuthInterceptor,
    AsyncJwksCache,
    AsyncTokenClient,
    AuthInterceptor,
    Jwks,
    JwksCache,
    TokenClient,
)

#: the audience the protected services accept
AUDIENCE = "mesh"


@dataclass(frozen=True)
class Setup:
    """How to build a protected server.

    Attributes:
        handler: the generic handler to serve (async methods for "aio").
        fetches: receives the thread name of each JWKS fetch.
        cache_kw: keyword arguments of the JWKS cache (e.g. ``clock``).
        interceptor_kw: keyword arguments of the interceptor beyond issuer and audience.
        options: channel arguments of the server.
        credentials: TLS credentials of the port; plaintext if None.
        worker_prefix: name prefix of the blocking server's worker threads.
        health: also serve the standard health service.
        load: load the key cache (one fetch) before the server starts.
        client_kw: how the key cache's token client reaches tokensvc (TLS settings).
    """

    handler: grpc.GenericRpcHandler
    fetches: list[str]
    cache_kw: Mapping[str, Any] = field(default_factory=dict)
    interceptor_kw: Mapping[str, Any] = field(default_factory=dict)
    options: Sequence[tuple[str, Any]] = ()
    credentials: grpc.ServerCredentials | None = None
    worker_prefix: str = "protected-worker"
    health: bool = False
    load: bool = False
    client_kw: Mapping[str, Any] = field(default_factory=lambda: {"insecure": True})


def _add_port(server: Any, credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        return server.add_insecure_port("127.0.0.1:0")
    return server.add_secure_port("127.0.0.1:0", credentials)


def _interceptor_kw(service: ServerThread, setup: Setup) -> dict[str, Any]:
    return {"issuer": service.settings.issuer, "audience": AUDIENCE, **setup.interceptor_kw}


def _start_sync(service: ServerThread, setup: Setup) -> tuple[str, Callable[[], None]]:
    client = TokenClient(service.target, **setup.client_kw)

    def fetch() -> Jwks:
        setup.fetches.append(threading.current_thread().name)
        return client.get_keys()

    cache = JwksCache(fetch, **setup.cache_kw)
    if setup.load:
        cache.load()
    interceptor = AuthInterceptor(cache, **_interceptor_kw(service, setup))
    server = grpc.server(
        futures.ThreadPoolExecutor(4, thread_name_prefix=setup.worker_prefix),
        interceptors=[interceptor],
        options=setup.options,
    )
    server.add_generic_rpc_handlers((setup.handler,))
    if setup.health:
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = _add_port(server, setup.credentials)
    server.start()

    def stop() -> None:
        server.stop(None)
        client.close()

    return f"127.0.0.1:{port}", stop


def _start_aio(service: ServerThread, setup: Setup) -> tuple[str, Callable[[], None]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def start() -> tuple[grpc.aio.Server, AsyncTokenClient, int]:
        client = AsyncTokenClient(service.target, **setup.client_kw)

        async def fetch() -> Jwks:
            setup.fetches.append(threading.current_thread().name)
            return await client.get_keys()

        cache = AsyncJwksCache(fetch, **setup.cache_kw)
        if setup.load:
            await cache.load()
        interceptor = AioAuthInterceptor(cache, **_interceptor_kw(service, setup))
        server = grpc.aio.server(interceptors=[interceptor], options=setup.options)
        server.add_generic_rpc_handlers((setup.handler,))
        if setup.health:
            health_pb2_grpc.add_HealthServicer_to_server(health_async.HealthServicer(), server)
        port = _add_port(server, setup.credentials)
        await server.start()
        return server, client, port

    try:
        server, client, port = run(start())
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        raise

    async def shutdown() -> None:
        await server.stop(None)
        await client.close()

    def stop() -> None:
        try:
            run(shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()

    return f"127.0.0.1:{port}", stop


def start_server(service: ServerThread, kind: str, setup: Setup) -> tuple[str, Callable[[], None]]:
    """Start a protected server of ``kind`` ("sync" or "aio") keyed by ``service``.

    Returns:
        its ``host:port`` and a function that stops it, its token client and its loop.
    """
    return {"sync": _start_sync, "aio": _start_aio}[kind](service, setup)
