"""A stolen bound token is audited as ``bound_token_misuse`` (a security event) and still
counted where a ``certificate_mismatch`` always was: ``tokensvc_auth_failures_total`` with
its ``rpc`` and ``reason`` labels (the alert rules in deploy/prometheus read that series)."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tokensvc.observe import metrics


def test_bound_token_misuse_counts_as_the_auth_failure_it_was():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counters = metrics.ServerMetrics(provider.get_meter("test"))
    counters.audit_event(
        "bound_token_misuse",
        {"rpc": "Refresh", "code": "certificate_mismatch", "session_id": "s", "peer": "p"},
    )
    counters.audit_event("auth_failed", {"rpc": "Refresh", "code": "malformed"})
    data = reader.get_metrics_data()
    points = {
        (p.attributes["rpc"], p.attributes["reason"]): p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "tokensvc.auth.failures"
        for p in m.data.data_points
    }
    assert points == {("Refresh", "certificate_mismatch"): 1, ("Refresh", "malformed"): 1}
    provider.shutdown()
