"""Refused calls leave no exception events in their spans.

A call the service refuses (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...)
ends with ``context.abort``, which raises ``grpc.aio.AbortError`` through the
OpenTelemetry server interceptor. The interceptor records that as an exception event with
a full stack trace, twice (once itself, once when its span closes), for what is normal
life of a token service. The status code is already on the span (its servicer-context
wrapper sets it on abort), so here the interceptor's tracer opens spans that do not
record exceptions on exit and whose ``record_exception`` ignores aborts: an uncaught
error (a bug) is still recorded, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpc.aio
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.trace import TracerProvider


class _Span:
    """A span whose ``record_exception`` leaves out gRPC aborts (refusals)."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def record_exception(self, exception: BaseException, *args: Any, **kwargs: Any) -> None:
        if not isinstance(exception, grpc.aio.AbortError):
            self._span.record_exception(exception, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


class _Tracer:
    """The interceptor's tracer, opening :class:`_Span` spans."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer

    @contextlib.contextmanager
    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Iterator[_Span]:
        kwargs["record_exception"] = False
        with self._tracer.start_as_current_span(*args, **kwargs) as span:
            yield _Span(span)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracer, name)


def server_interceptor(provider: TracerProvider, untraced: frozenset[str] = frozenset()) -> Any:
    """OpenTelemetry's aio server interceptor, without exception events for refusals, and
    leaving the methods ``untraced`` (full names, ``/package.Service/Method``) alone."""

    def traced(details: grpc.HandlerCallDetails) -> bool:
        return details.method not in untraced

    interceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=traced if untraced else None
    )
    interceptor._tracer = _Tracer(interceptor._tracer)
    return interceptor
