"""The RPC duration histogram, recorded by a grpc.aio server interceptor.

``opentelemetry-instrumentation-grpc`` creates spans but records no metrics, and gRPC's own
OpenTelemetry plugin does not report server metrics under ``grpc.aio``; so this interceptor
times each call itself. It follows the OpenTelemetry RPC semantic conventions 1.44:
``rpc.server.call.duration`` in seconds with ``rpc.system.name="grpc"``, ``rpc.method``
(``package.Service/Method``; calls of methods the server does not serve are not recorded,
so the attribute stays bounded) and ``rpc.response.status_code`` (the gRPC code's name,
``OK`` included). A streaming call (WatchRevocations) is measured over its whole stream.

Installed only when metrics are exported (:func:`interceptors` returns nothing otherwise).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from tokensvc.observe.metrics import ServerMetrics

_BY_VALUE = {code.value[0]: code.name for code in grpc.StatusCode}


def _status(context: grpc.aio.ServicerContext[Any, Any], failed: BaseException | None) -> str:
    code = context.code()  # set by abort() or set_code(); None when left alone
    if code is None:
        if failed is None:
            return "OK"
        return "UNKNOWN" if isinstance(failed, Exception) else "CANCELLED"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _BY_VALUE.get(int(code), "UNKNOWN")


class RpcTimer(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Times every unary and server-streaming call into ``metrics.rpc_duration``."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.histogram = metrics.rpc_duration

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = str(details.method).lstrip("/")
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        return handler

    def _record(self, start: float, method: str, status: str) -> None:
        self.histogram.record(
            time.perf_counter() - start,
            {"rpc.system.name": "grpc", "rpc.method": method, "rpc.response.status_code": status},
        )

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            failed: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as err:
                failed = err
                raise
            finally:
                self._record(start, method, _status(context, failed))

        return timed

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def timed(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            failed: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as err:
                failed = err
                raise
            finally:
                self._record(start, method, _status(context, failed))

        return timed


def interceptors(metrics: ServerMetrics) -> list[Any]:
    """The interceptor to install, or none when metrics are off (no cost per call)."""
    return [RpcTimer(metrics)] if metrics.enabled else []
