"""OpenTelemetry set-up, paid for only when spans are exported.

With an exporter (``OTEL_TRACES_EXPORTER=console`` prints spans, ``otlp`` exports with
``opentelemetry-exporter-otlp`` if it is installed) or a tracer provider handed in: a server
span per RPC joining the caller's W3C trace context, Redis calls as child spans. Without one
(the default) no instrumentation is installed at all -- neither the gRPC server interceptor
nor redis-py's -- because even an always-off sampler keeps most of their cost; logs and audit
records still carry the caller's trace id, read from its ``traceparent`` metadata only when
something is logged (:func:`current_trace_id`). Spans never carry tokens: the gRPC
instrumentation records method and status, not messages.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from opentelemetry import trace
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tokensvc.observe.quiet_spans import server_interceptor
from tokensvc.redis import lean

log = logging.getLogger("tokensvc.telemetry")

# the call being served (set per RPC by tokensvc.api.status.rpc): its metadata is parsed for a
# traceparent only when a log line or audit record wants the trace id
_call: contextvars.ContextVar[Any] = contextvars.ContextVar("tokensvc_call", default=None)
_W3C = TraceContextTextMapPropagator()


def _exporter_processor(name: str) -> SpanProcessor | None:
    if name == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp; not exporting"
            )
            return None
        return BatchSpanProcessor(OTLPSpanExporter())
    if name not in ("", "none"):
        log.warning("unsupported OTEL_TRACES_EXPORTER=%s; not exporting", name)
    return None


def setup_tracing(provider: TracerProvider | None = None) -> TracerProvider | None:
    """The tracer provider to instrument with, or ``None`` when nothing is exported.

    A provider handed in (tests) or an exporter named by ``OTEL_TRACES_EXPORTER`` means
    tracing: redis-py is instrumented (once per process) and the provider returned for
    :func:`server_interceptors`. Otherwise any redis-py instrumentation is removed and
    ``None`` returned.
    """
    if provider is None:
        processor = _exporter_processor(
            os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        )
        if processor is not None:
            provider = TracerProvider(
                resource=Resource.create(
                    {"service.name": os.environ.get("OTEL_SERVICE_NAME", "tokensvc")}
                )
            )
            provider.add_span_processor(processor)
    instrumentor = RedisInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    if provider is not None:
        instrumentor.instrument(tracer_provider=provider)
    lean.trace_with(provider)  # the hot scripts bypass redis-py's instrumented client
    return provider


def server_interceptors(
    provider: TracerProvider | None, services: Iterable[ServiceDescriptor] = ()
) -> list[Any]:
    """gRPC aio server interceptors creating one span per RPC (none without a provider).

    The server-streaming methods of ``services`` get no span: OpenTelemetry's interceptor
    runs a streamed response with ``async for``, and every handler is registered as a
    coroutine (:mod:`tokensvc.handlers`; ``Health.Watch`` is one of its own), which that
    would fail UNKNOWN. Such streams (the revocation feed, health watches, reflection) last
    as long as a connection: as spans they would say little anyway."""
    if provider is None:
        return []
    streaming = frozenset(
        f"/{service.full_name}/{method.name}"
        for service in services
        for method in service.methods
        if method.server_streaming
    )
    return [server_interceptor(provider, streaming)]  # refused calls: no exception events


def serving(call: Any) -> None:
    """Note the call (a ``grpc.aio.ServicerContext``) the current task serves: cheap, as its
    metadata is only looked at by :func:`current_trace_id`."""
    _call.set(call)


def untraced() -> contextvars.Context:
    """A context for background tasks whose Redis calls should not be traced (the audit
    writer, the revocation feed reader, the maintenance tick): traces are per RPC, and a
    root span per batch or per tick only costs CPU and hides the RPCs."""
    with suppress_instrumentation():
        return contextvars.copy_context()


def current_trace_id() -> str:
    """Hex trace id for logs and audit records: the current span's, else that of the
    ``traceparent`` the served call came with (tracing not exported), else ''."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return format(ctx.trace_id, "032x")
    call = _call.get()
    if call is None:
        return ""
    carrier = {
        key: value for key, value in call.invocation_metadata() or () if key == "traceparent"
    }
    if not carrier:
        return ""
    parent = trace.get_current_span(_W3C.extract(carrier)).get_span_context()
    return format(parent.trace_id, "032x") if parent.is_valid else ""
