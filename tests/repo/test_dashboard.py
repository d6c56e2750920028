"""The Grafana dashboard and the alerting rules only query metrics tokensvc exports.

The exported names are taken from the real instruments and the real Prometheus exporter:
every server instrument is made to report once (each audit event kind, an RPC, the state
gauges) and the client library's instruments are read with live sources, then the metric
names referenced by every dashboard query and alert expression must be among them.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tokensvc.cli.devcerts import DevCA
from tokensvc.observe import metrics
from tokensvc_client import _metrics
from tokensvc_client._feed_core import _FeedCore

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokensvc.json"
RULES = ROOT / "deploy" / "prometheus" / "tokensvc-alerts.yml"
#: PromQL words that look like metric names
_PROMQL = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "max",
    "min",
    "and",
    "offset",
    "label_values",
    "le",
    "job",
    "without",
    "count_over_time",
}


def _names(text: str) -> set[str]:
    families = text_string_to_metric_families(text)
    names = set()
    for family in families:
        names |= {sample.name for sample in family.samples}
    return names


def server_names() -> set[str]:
    meters = metrics.setup(prometheus=True)
    assert meters.render is not None
    for event in meters.events:
        meters.audit_event(event, {"reason": "Issue: x", "target": "subject", "bound": "0"})
    meters.rpc_duration.record(0.001, {"rpc.method": "x/y", "rpc.response.status_code": "OK"})
    ring = SimpleNamespace(records={"k": {"state": "active", "activated_ms": time.time() * 1000}})
    hub = SimpleNamespace(watcher_count=0, sent=0, held=0, resyncs=0)
    audit = SimpleNamespace(pending=0, dropped=0, write_failures=0)
    with tempfile.TemporaryDirectory() as pki:
        cert = DevCA(Path(pki)).issue("server", hosts=("localhost",), server=True).cert
        errors = Counter({"ConnectionError": 1})
        retries = Counter({"TryAgainError": 1})
        meters.observe(
            metrics.State(ring, 100, hub, audit, errors, tls_cert=cert, slot_retries=retries)
        )
        text = meters.render()[0].decode()  # the certificate gauge reads the file now
    metrics.observe_listeners(meters, [SimpleNamespace(connections=1, refused=0)])
    try:
        return _names(text) | _names(meters.render()[0].decode())
    finally:
        metrics.shutdown(meters)


def client_names() -> set[str]:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    _metrics.register(provider.get_meter(_metrics.SCOPE))
    # a live feed (its state gauges report only while one exists)
    feed = _FeedCore(
        max_staleness=1, fail_closed=False, backoff=(0.1, 1), clock=time.time, revocations=None
    )
    try:
        return _names(generate_latest(registry).decode())
    finally:
        del feed
        provider.shutdown()


def referenced(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # label lists
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))
    return {w for w in words if "_" in w and w not in _PROMQL and not w.startswith("$")}


def test_every_dashboard_query_and_alert_uses_exported_metrics():
    exported = server_names() | client_names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load(RULES.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) > 20
    for expr in exprs:
        names = referenced(expr)
        assert names, expr
        assert names <= exported, (expr, names - exported)


def test_dashboard_covers_rpcs_tokens_feed_and_keys():
    dashboard = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard)
    for name in (
        "rpc_server_call_duration_seconds_bucket",
        "tokensvc_tokens_reuse_detections_total",
        "tokensvc_feed_watchers",
        "tokensvc_client_feed_stale",
        "tokensvc_keys_rotation_due_seconds",
    ):
        assert name in text, name
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
