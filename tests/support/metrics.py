"""Reading a running tokensvc's /metrics the way Prometheus does: over HTTP, parsed with
prometheus_client's parser."""

from __future__ import annotations

import http.client

from prometheus_client.parser import text_string_to_metric_families

from tokensvc.observe import metrics

#: (sample name, labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """GET /metrics; the content type and every sample."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", metrics.METRICS_PATH)
        reply = conn.getresponse()
        assert reply.status == 200
        text = reply.read().decode()
        kind = reply.getheader("Content-Type", "")
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return kind, samples
