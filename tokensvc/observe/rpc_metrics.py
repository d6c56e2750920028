"""The RPC duration histogram, recorded by a wrapper every handler is registered with.

``opentelemetry-instrumentation-grpc`` creates spans but records no metrics, and gRPC's own
OpenTelemetry plugin does not report server metrics under ``grpc.aio``; so tokensvc times
each call itself, in a wrapper applied once per method when the services register
(:class:`tokensvc.handlers.Registrar`; a grpc.aio interceptor would cost more per call). It
follows the OpenTelemetry RPC semantic conventions 1.44: ``rpc.server.call.duration`` in
seconds with ``rpc.system.name="grpc"``, ``rpc.method`` (``package.Service/Method``; calls
of methods the server does not serve are not recorded, so the attribute stays bounded) and
``rpc.response.status_code`` (the gRPC code's name, ``OK`` included). A streaming call
(WatchRevocations, Health.Watch, reflection) is measured over its whole stream.

Installed only when metrics are exported (:func:`wrappers` returns nothing otherwise).
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import grpc.aio

from tokensvc.handlers import Behaviour, Context, MethodWrapper, wrap
from tokensvc.observe.metrics import ServerMetrics
from tokensvc_client.handlers import Handler

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


class RpcTimer:
    """Times every call (any shape, see :mod:`tokensvc.handlers`) into
    ``metrics.rpc_duration``; :meth:`wrapper` is its method wrapper."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.histogram = metrics.rpc_duration

    def wrapper(self, method: str, handler: Handler) -> Handler:
        attributes = {"rpc.system.name": "grpc", "rpc.method": method.lstrip("/")}
        return wrap(handler, lambda behaviour: self._time(behaviour, attributes))

    def _time(self, behaviour: Behaviour, attributes: dict[str, str]) -> Behaviour:
        histogram = self.histogram

        async def timed(request: Any, context: Context) -> Any:
            start = time.perf_counter()
            failed: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as err:
                failed = err
                raise
            finally:
                histogram.record(
                    time.perf_counter() - start,
                    {**attributes, "rpc.response.status_code": _status(context, failed)},
                )

        return timed


def wrappers(metrics: ServerMetrics) -> list[MethodWrapper]:
    """The method wrapper to register handlers with, or none when metrics are off (no cost
    per call)."""
    return [RpcTimer(metrics).wrapper] if metrics.enabled else []
