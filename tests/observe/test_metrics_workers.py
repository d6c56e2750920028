"""Metrics of ``serve --workers N``: worker i serves ``--metrics-listen`` PORT+i, so each
worker is a scrape target with steady counters, and the counters of all targets add up to
what the service did; the shared ``--http-listen`` port serves no ``/metrics`` (a scrape
there would reach a random worker). Real processes over loopback."""

from __future__ import annotations

import http.client

import grpc

from tests.support.metrics import scrape
from tests.support.processes import Serve, adjacent_free_ports, failed_start
from tokensvc.observe import metrics
from tokensvc.redis.embedded import free_port
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

CHANNELS = 16  # connections: SO_REUSEPORT spreads them over the workers
CALLS = 3  # Issue calls per connection


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def _issued(port: int) -> tuple[float, set[str]]:
    """tokensvc_tokens_issued_total of one target, and its service_instance_id(s)."""
    _, samples = scrape(port)
    issued = sum(v for (name, _), v in samples.items() if name == "tokensvc_tokens_issued_total")
    instances = {
        value
        for (name, labels) in samples
        if name == "target_info"
        for key, value in labels
        if key == "service_instance_id"
    }
    return issued, instances


def test_each_worker_is_a_scrape_target_and_the_targets_add_up(tmp_path, redis_url):
    grpc_port, http_port, metrics_port = free_port(), free_port(), adjacent_free_ports()
    serve = Serve(
        "--insecure",
        "--workers",
        "2",
        "--listen",
        f"127.0.0.1:{grpc_port}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--rate-issue",
        "off",
        "--redis-url",
        redis_url,
        "--data-dir",
        str(tmp_path / "data"),
    )
    try:
        serve.wait_listening(count=2)
        targets = (metrics_port, metrics_port + 1)
        assert sum(_issued(port)[0] for port in targets) == 0
        for _ in range(CHANNELS):
            # a subchannel pool of its own: a new connection each time (gRPC's global pool
            # may hand a closing channel's connection, so one worker, to the next channel)
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=options) as chan:
                stub = pb_grpc.TokenServiceStub(chan)
                for _ in range(CALLS):
                    stub.Issue(pb.IssueRequest(subject="scraped"), timeout=10)
        per_worker = [_issued(port) for port in targets]
        # every call counted once, by the worker that served it; both served some
        assert sum(count for count, _ in per_worker) == CHANNELS * CALLS, per_worker
        assert all(count > 0 for count, _ in per_worker), per_worker
        # and the two processes' series differ by their resource (OTLP too)
        first, second = (ids for _, ids in per_worker)
        assert len(first) == len(second) == 1 and first != second, per_worker
        # the JWKS listener all workers share: no /metrics, the keys as ever
        assert _status(http_port, metrics.METRICS_PATH) == 404
        assert _status(http_port, "/.well-known/jwks.json") == 200
    finally:
        assert serve.stop() == 0
    assert "Traceback" not in serve.errors()


def test_a_metrics_port_range_past_65535_is_a_start_up_error(tmp_path):
    line = failed_start(
        "--insecure",
        "--workers",
        "3",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--metrics-listen",
        "127.0.0.1:65534",
        "--data-dir",
        str(tmp_path / "data"),
    )
    assert "--metrics-listen" in line and "65535" in line
