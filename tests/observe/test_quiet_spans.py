"""A refused call's span carries its status, not exception events with stack traces."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support import wait_until
from tokensvc_client.v1 import tokensvc_pb2 as pb


def test_refused_calls_record_no_exception_events(make_settings, start_server):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    stub = start_server(make_settings(), tracer_provider=provider).stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Refresh(pb.RefreshRequest(refresh_token="not-a-token"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.Issue(pb.IssueRequest(subject=""))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def server_spans() -> list | None:
        spans = [s for s in exporter.get_finished_spans() if s.name.startswith("/tokensvc")]
        return spans if len(spans) == 2 else None

    # a server span ends just after its answer is sent
    spans = wait_until(server_spans, 5, what="both server spans ended")
    assert {s.name.rsplit("/", 1)[1] for s in spans} == {"Refresh", "Issue"}
    for span in spans:
        assert [event.name for event in span.events] == [], span.name
