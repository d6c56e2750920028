"""OpenTelemetry set-up: a span per RPC (server side), Redis calls as child spans.

Exporters follow the standard environment: ``OTEL_TRACES_EXPORTER=console`` prints spans,
``otlp`` exports with ``opentelemetry-exporter-otlp`` if it is installed; the default is to
export nothing (spans are still created, so trace context propagates to Redis and logs).
W3C trace context is the API's default propagator. Spans never carry tokens: the gRPC
instrumentation records method and status, not messages.
"""

from __future__ import annotations

import contextvars
import logging
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

log = logging.getLogger(__name__)


def _exporter_processor(name: str) -> SpanProcessor | None:
    if name == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp; not exporting"
            )
            return None
        return BatchSpanProcessor(OTLPSpanExporter())
    if name not in ("", "none"):
        log.warning("unsupported OTEL_TRACES_EXPORTER=%s; not exporting", name)
    return None


def setup_tracing(provider: TracerProvider | None = None) -> TracerProvider:
    """Create (or take) the tracer provider and instrument redis-py once per process."""
    if provider is None:
        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME", "tokensvc")}
            )
        )
        processor = _exporter_processor(
            os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        )
        if processor is not None:
            provider.add_span_processor(processor)
    instrumentor = RedisInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=provider)
    return provider


def server_interceptors(provider: TracerProvider) -> list[Any]:
    """gRPC aio server interceptors creating one span per RPC."""
    return [aio_server_interceptor(tracer_provider=provider)]  # type: ignore[no-untyped-call]


def untraced() -> contextvars.Context:
    """A context for background tasks whose Redis calls should not be traced (the audit
    writer, the revocation feed reader, the maintenance tick): traces are per RPC, and a
    root span per batch or per tick only costs CPU and hides the RPCs."""
    with suppress_instrumentation():
        return contextvars.copy_context()


def current_trace_id() -> str:
    """Hex trace id of the current span, for logs and audit records ('' outside a span)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
