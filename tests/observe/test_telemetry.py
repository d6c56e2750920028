"""Tracing: a server span per RPC with Redis calls as child spans, W3C trace context
propagated from the caller, and no token in any span or log."""

from __future__ import annotations

import logging

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokensvc.families.tokens import refresh_hash
from tokensvc_client.v1 import tokensvc_pb2 as pb


def test_rpc_span_with_redis_children_and_propagated_trace(make_settings, start_server, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stub = start_server(make_settings(), tracer_provider=provider).stub()

    caller = provider.get_tracer("test-caller")
    caplog.set_level(logging.DEBUG)
    with caller.start_as_current_span("caller") as parent:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        pair = stub.Issue(pb.IssueRequest(subject="alice"), metadata=tuple(carrier.items())).tokens
        stub.Refresh(
            pb.RefreshRequest(refresh_token=pair.refresh_token), metadata=tuple(carrier.items())
        )
    trace_id = parent.get_span_context().trace_id

    provider.force_flush()
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    issue = by_name["/tokensvc.v1.TokenService/Issue"]
    assert issue.kind == trace.SpanKind.SERVER
    assert issue.context.trace_id == trace_id  # joined the caller's trace
    redis_children = [
        s for s in spans if s.parent is not None and s.parent.span_id == issue.context.span_id
    ]
    assert redis_children and all(s.attributes.get("db.system") == "redis" for s in redis_children)

    dump = repr(
        [(s.name, dict(s.attributes or {}), [e.attributes for e in s.events]) for s in spans]
    )
    text = dump + caplog.text
    for secret in (pair.access_token, pair.refresh_token, refresh_hash(pair.refresh_token)):
        assert secret not in text
        assert secret[-40:] not in text


def test_background_tasks_make_no_root_spans(make_settings, start_server):
    """The audit writer, the revocation feed reader and the key-ring tick talk to Redis all
    the time; only RPCs make traces."""
    import time

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stub = start_server(make_settings(), tracer_provider=provider).stub()
    stub.Issue(pb.IssueRequest(subject="alice"))  # an audit record to write
    time.sleep(1.5)  # a key-ring tick, feed reads, the audit batch
    provider.force_flush()
    roots = [s.name for s in exporter.get_finished_spans() if s.parent is None]
    assert roots == ["/tokensvc.v1.TokenService/Issue"]


def test_without_an_exporter_nothing_is_instrumented_and_logs_keep_the_trace_id(
    make_settings, start_server, caplog, monkeypatch
):
    """The default: no server interceptor and no Redis instrumentation (their cost is paid
    only when spans go somewhere), yet audit records and log lines of a call that came with
    a traceparent carry its trace id."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    srv = start_server(make_settings(audit_log_all=True))  # issued events logged too
    assert not RedisInstrumentor().is_instrumented_by_opentelemetry
    assert srv.running.tracer_provider is None

    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
    stub = srv.stub()
    stub.Issue(pb.IssueRequest(subject="alice"), metadata=traceparent)
    stub.Issue(pb.IssueRequest(subject="bob"))
    stub.Issue(pb.IssueRequest(subject="carol"), metadata=(("traceparent", "00-zz-bad-01"),))
    issued = {r.subject: r for r in caplog.records if getattr(r, "event", "") == "issued"}
    assert issued["alice"].trace_id == trace_id
    assert not hasattr(issued["bob"], "trace_id")
    assert not hasattr(issued["carol"], "trace_id")  # a malformed traceparent is ignored


def test_an_exporter_in_the_environment_turns_tracing_on(monkeypatch):
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    from tokensvc.observe import tracing

    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.setup_tracing() is None
    assert tracing.server_interceptors(None) == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = tracing.setup_tracing()
    try:
        assert provider is not None
        assert RedisInstrumentor().is_instrumented_by_opentelemetry
        assert len(tracing.server_interceptors(provider)) == 1
    finally:
        monkeypatch.delenv("OTEL_TRACES_EXPORTER")
        assert tracing.setup_tracing() is None
        assert not RedisInstrumentor().is_instrumented_by_opentelemetry


def test_streaming_rpcs_work_and_unary_ones_are_traced_when_tracing_is_on(
    make_settings, start_server
):
    """The streaming RPCs (WatchRevocations, Health.Watch, reflection) are registered as
    coroutines (tokensvc.handlers): with tracing on they must still answer, not fail
    UNKNOWN inside the tracing interceptor."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = start_server(make_settings(), tracer_provider=provider)
    stub = srv.stub()
    stub.Issue(pb.IssueRequest(subject="alice"))

    feed = stub.WatchRevocations(pb.WatchRevocationsRequest(), timeout=30)
    assert next(iter(feed)).kind == pb.RevocationEvent.Kind.RESET
    feed.cancel()
    health = health_pb2_grpc.HealthStub(srv.channel()).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=30
    )
    assert next(iter(health)).status == health_pb2.HealthCheckResponse.SERVING
    health.cancel()
    reflection = reflection_pb2_grpc.ServerReflectionStub(srv.channel())
    (answer,) = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
    )
    assert "tokensvc.v1.TokenService" in {s.name for s in answer.list_services_response.service}

    provider.force_flush()
    assert "/tokensvc.v1.TokenService/Issue" in {s.name for s in exporter.get_finished_spans()}
