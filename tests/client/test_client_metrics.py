"""The client library's metrics: exposed through the host's OpenTelemetry SDK when it has
one (read from the SDK like any exporter would), and nothing needed without it.

The host's SDK here is a real MeterProvider with an in-memory reader, set as the global
provider (once per process, as a host service does at start-up).
"""

from __future__ import annotations

import gc
import subprocess
import sys

import grpc
import pytest
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.client.conftest import bearer
from tokensvc_client import RevocationFeed

READER = InMemoryMetricReader()


@pytest.fixture(scope="module")
def host_sdk() -> InMemoryMetricReader:
    otel.set_meter_provider(MeterProvider(metric_readers=[READER]))
    return READER


def figures(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    data = reader.get_metrics_data()
    out = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            if scope.scope.name != "tokensvc_client":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    out[(metric.name, tuple(sorted(point.attributes.items())))] = point.value
    return out


def test_interceptor_cache_and_jwks_figures(host_sdk, tokensvc, client, make_protected):
    before = figures(host_sdk)
    protected = make_protected(tokensvc, "sync")
    token = client.issue("alice").access_token
    for _ in range(3):
        protected.call("unary_unary", bearer(token))
    with pytest.raises(grpc.RpcError) as err:
        protected.call("unary_unary", ())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = figures(host_sdk)

    def delta(name: str, **attributes: str) -> float:
        key = (f"tokensvc.client.{name}", tuple(sorted(attributes.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("calls", outcome="allowed", reason="") == 3
    assert delta("calls", outcome="refused", reason="missing_token") == 1
    assert delta("token_cache.misses") == 1 and delta("token_cache.hits") == 2
    assert delta("jwks.fetches") == 1 and delta("jwks.failures") == 0


def test_feed_figures(host_sdk, tokensvc):
    # the gauges report the worst of the live feeds: collect earlier tests' stopped ones
    gc.collect()
    with tokensvc.channel() as chan:
        feed = RevocationFeed(chan, max_staleness=30).start()
        try:
            assert feed.wait_connected(10)
            now = figures(host_sdk)
            assert now[("tokensvc.client.feed.connected", ())] == 1
            assert now[("tokensvc.client.feed.stale", ())] == 0
            assert 0 <= now[("tokensvc.client.feed.last_event.age", ())] < 60
        finally:
            feed.close()


def test_the_base_client_needs_no_opentelemetry():
    """Without opentelemetry installed the client imports, verifies and counts locally."""
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed: any import of it fails
import tokensvc_client
from tokensvc_client import _metrics
from tokensvc_client.verifier import Verifier, KeySet
assert _metrics._otel is None
v = Verifier("https://x", "mesh")
try:
    v.verify("not-a-token", KeySet({}))
except Exception as err:
    print(type(err).__name__, _metrics.TOTALS.misses)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "InvalidToken 1"
