"""Rows rpc.introspect|issue.metrics_off / .metrics_on: the same RPC under the standard load
against a tokensvc without and with metrics (``--metrics-listen``: the Prometheus reader,
the RPC histogram interceptor and a counter per audit event), scraped once a second as
Prometheus would, the two servers side by side and loaded in turn (three rounds per RPC,
the median kept); and interceptor.warm.metrics_on: the warm interceptor decision with an
OpenTelemetry SDK meter provider installed in the host process (the client library's
figures are then exported; the call path still only increments integers)."""

from __future__ import annotations

import threading
import urllib.request

from opentelemetry import metrics as otel
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, generate_latest

from bench.interceptor_rows import _decide
from bench.loadgen import LoadResult
from bench.run import AUDIENCE, ISSUER, SERVICE, Bench, Target
from bench.service_rows import issue_request
from tokensvc.redis.embedded import free_port
from tokensvc_client import TokenClient
from tokensvc_client._auth import Authenticator
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Verifier

ROWS = (
    "rpc.introspect.metrics_off",
    "rpc.introspect.metrics_on",
    "rpc.issue.metrics_off",
    "rpc.issue.metrics_on",
    "interceptor.warm.metrics_on",
)
TARGETS = [
    Target("rpc.introspect.metrics_on", "rpc.introspect.metrics_off", at_least=0.9),
    Target("rpc.issue.metrics_on", "rpc.issue.metrics_off", at_least=0.9),
    Target(
        "rpc.introspect.metrics_on", "rpc.introspect.metrics_off", "server_cpu_us", at_most=1.15
    ),
    Target("interceptor.warm.metrics_on", "", "us_per_op", at_most=10),
]


def _scraper(port: int, stop: threading.Event) -> threading.Thread:
    def scrape() -> None:
        while not stop.wait(1.0):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                r.read()

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    return thread


def run(b: Bench) -> None:
    n = b.n(4000)
    issue = issue_request()
    port = free_port()
    # both servers up at once and loaded in turn, three rounds per RPC: a burst of other
    # work on a shared machine falls on both sides alike; each row is its median round
    b.progress("rpc.introspect|issue.metrics_off / .metrics_on")
    with b.serve() as off, b.serve("--metrics-listen", f"127.0.0.1:{port}") as on:
        stop = threading.Event()
        scraper = _scraper(port, stop)
        try:
            client = TokenClient(off.target, insecure=True)
            access = client.issue("bench-user").access_token
            client.close()
            introspect = pb.IntrospectRequest(token=access).SerializeToString()
            for rpc, method, request in (
                ("introspect", "Introspect", introspect),
                ("issue", "Issue", issue),
            ):
                runs: dict[str, list[LoadResult]] = {}
                for _ in range(3):
                    for suffix, server in (("metrics_off", off), ("metrics_on", on)):
                        result = b.load(
                            server.target, SERVICE + method, [request] * n, server_pid=server.pid
                        )
                        runs.setdefault(f"rpc.{rpc}.{suffix}", []).append(result)
                for name, results in runs.items():
                    results.sort(key=lambda r: r.server_cpu / len(r.latencies))
                    b.record_load(name, results[len(results) // 2])
        finally:
            stop.set()
            scraper.join(5)

    # the host service's SDK: a meter provider with a Prometheus reader, as a service
    # exporting its own metrics has; the client library's instruments attach to it
    registry = CollectorRegistry()
    otel.set_meter_provider(
        MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    )
    with b.serve() as server:
        client = TokenClient(server.target, insecure=True)
        token = client.issue("bench-user", roles=["reader"]).access_token
        keys = client.get_keys().key_set()
        client.close()
    auth = Authenticator(Verifier(ISSUER, AUDIENCE))
    headers = (("authorization", f"Bearer {token}"),)
    b.record_op("interceptor.warm.metrics_on", lambda: _decide(auth, headers, keys), b.n(20000))
    if b"tokensvc_client_calls_total" not in generate_latest(registry):
        raise RuntimeError("the client library's metrics did not reach the host SDK")
