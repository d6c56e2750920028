"""Server metrics: /metrics on the listeners, the RPC histogram, a counter per audit event
kind (moved by exactly one per event), the state gauges, and OTLP export.

A real tokensvc over mTLS with a caller policy; metrics are read the way Prometheus reads
them, over HTTP from the running server, and parsed with prometheus_client's parser.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from tests.support import ServerThread
from tests.support.metrics import Samples, scrape
from tokensvc.cli.devcerts import DevCA, Issued
from tokensvc.config import Rate, Settings
from tokensvc.observe import metrics
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
ORDERS = "spiffe://tokensvc.test/ns/shop/sa/orders"
ADMIN_RPCS = ("Issue", "Revoke", "LockSubject", "UnlockSubject", "RotateKeys", "RetireKey")
ROOT = Path(__file__).resolve().parents[2]


def moved(before: Samples, after: Samples, prefix: str = "tokensvc_") -> dict[str, float]:
    """Counter samples (``*_total``) that changed, as ``name{k=v,...}`` -> delta."""
    out = {}
    for key, value in after.items():
        name, labels = key
        # Redis unavailability and slot retries are counted per process (other tests'
        # servers share them)
        if name in ("tokensvc_redis_unavailable_total", "tokensvc_redis_slot_retries_total"):
            continue
        if name.startswith(prefix) and name.endswith("_total"):
            delta = value - before.get(key, 0.0)
            if delta:
                shown = ",".join(f"{k}={v}" for k, v in sorted(labels))
                out[f"{name}{{{shown}}}"] = delta
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[DevCA, dict[str, Issued]]:
    ca = DevCA(tmp_path_factory.mktemp("pki"))
    return ca, {
        "server": ca.issue("server", hosts=("127.0.0.1",), server=True),
        "admin": ca.issue("admin", spiffe_id=ADMIN),
        "orders": ca.issue("orders", spiffe_id=ORDERS),
        "two-uris": ca.issue("two-uris", common_name="x", uris=(ADMIN, ORDERS)),
    }


@pytest.fixture
def service(
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
    pki: tuple[DevCA, dict[str, Issued]],
    tmp_path: Path,
) -> ServerThread:
    ca, certs = pki
    policy = tmp_path / "policy.toml"
    policy.write_text("".join(f'[rpc.{rpc}]\nallow = ["{ADMIN}"]\n' for rpc in ADMIN_RPCS))
    return start_server(
        make_settings(
            insecure=False,
            tls_cert=certs["server"].cert,
            tls_key=certs["server"].key,
            tls_client_ca=ca.ca_path,
            policy_file=policy,
            metrics_listen="127.0.0.1:0",
            rate_issue=Rate(1, 3600),  # per subject: a second Issue for one subject is refused
            rate_auth_failures=Rate(0, 1),
            refresh_grace_seconds=30,  # so a replay in grace is seen too
        )
    )


def metrics_port(srv: ServerThread) -> int:
    assert srv.running.metrics_http is not None
    return srv.running.metrics_http.port


def stub_for(srv: ServerThread, pki, name: str) -> pb_grpc.TokenServiceStub:
    ca, certs = pki
    chan = channel(
        f"127.0.0.1:{srv.port}", ca=ca.ca_path, cert=certs[name].cert, key=certs[name].key
    )
    return pb_grpc.TokenServiceStub(chan)


def fails(call: Callable[[], object], code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code


def test_each_audit_event_moves_its_counter_by_exactly_one(service, pki):
    port = metrics_port(service)
    admin, orders = stub_for(service, pki, "admin"), stub_for(service, pki, "orders")
    spoof = stub_for(service, pki, "two-uris")
    state: dict[str, str] = {}

    def issue() -> None:
        state["pair"] = admin.Issue(pb.IssueRequest(subject="alice")).tokens.refresh_token

    def refresh() -> None:
        reply = admin.Refresh(pb.RefreshRequest(refresh_token=state["pair"]))
        state["old"], state["pair"] = state["pair"], reply.tokens.refresh_token
        state["sid"] = reply.tokens.session_id

    def pending_kid() -> str:
        keys = admin.RotateKeys(pb.RotateKeysRequest()).keys
        return next(k.kid for k in keys if k.state == "pending")

    steps: list[tuple[str, Callable[[], object], dict[str, float]]] = [
        ("issued", issue, {"tokensvc_tokens_issued_total{bound=false}": 1}),
        ("refreshed", refresh, {"tokensvc_tokens_refreshed_total{}": 1}),
        (
            "refresh_replayed (a lost reply retried within the grace window)",
            lambda: admin.Refresh(pb.RefreshRequest(refresh_token=state["old"])),
            {"tokensvc_tokens_refresh_replays_total{}": 1},
        ),
        (
            "revoked",
            lambda: admin.Revoke(pb.RevokeRequest(session_id=state["sid"])),
            {"tokensvc_revocations_total{target=session_id}": 1},
        ),
        (
            "auth_failed",
            lambda: fails(
                lambda: admin.Refresh(pb.RefreshRequest(refresh_token="tsr1_garbage")),
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            {"tokensvc_auth_failures_total{reason=malformed,rpc=Refresh}": 1},
        ),
        (
            "denied (policy)",
            lambda: fails(
                lambda: orders.Issue(pb.IssueRequest(subject="bob")),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            {"tokensvc_policy_denials_total{reason=policy,rpc=Issue}": 1},
        ),
        (
            "rate_limited",
            lambda: fails(
                lambda: admin.Issue(pb.IssueRequest(subject="alice")),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ),
            {"tokensvc_rate_limit_refusals_total{limit=Issue}": 1},
        ),
        (
            "locked",
            lambda: admin.LockSubject(pb.LockSubjectRequest(subject="dave")),
            {"tokensvc_subjects_locks_total{}": 1},
        ),
        (
            "denied (locked subject)",
            lambda: fails(
                lambda: admin.Issue(pb.IssueRequest(subject="dave")),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            {"tokensvc_policy_denials_total{reason=subject_locked,rpc=Issue}": 1},
        ),
        (
            "unlocked",
            lambda: admin.UnlockSubject(pb.UnlockSubjectRequest(subject="dave")),
            {"tokensvc_subjects_unlocks_total{}": 1},
        ),
        (
            "keys_rotated",
            lambda: state.update(kid=pending_kid()),
            {"tokensvc_keys_rotations_total{kind=scheduled}": 1},
        ),
        (
            "key_retired",
            lambda: admin.RetireKey(pb.RetireKeyRequest(kid=state["kid"])),
            {"tokensvc_keys_retirements_total{}": 1},
        ),
        (
            "identity_refused (and so denied)",
            lambda: fails(
                lambda: spoof.Issue(pb.IssueRequest(subject="erin")),
                grpc.StatusCode.PERMISSION_DENIED,
            ),
            {
                "tokensvc_identity_refusals_total{reason=several_uri_sans}": 1,
                "tokensvc_policy_denials_total{reason=policy,rpc=Issue}": 1,
            },
        ),
    ]
    # last: a replay of a rotated token kills the family (and fails authentication)
    steps.append(("(prepare a rotated token)", lambda: _rotated(admin, state), {}))
    steps.append(
        (
            "reuse_detected",
            lambda: fails(
                lambda: admin.Refresh(pb.RefreshRequest(refresh_token=state["rotated"])),
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            {
                "tokensvc_tokens_reuse_detections_total{}": 1,
                "tokensvc_auth_failures_total{reason=reused,rpc=Refresh}": 1,
            },
        )
    )
    for name, action, expected in steps:
        _, before = scrape(port)
        action()
        _, after = scrape(port)
        if expected:
            assert moved(before, after) == expected, name


def _rotated(admin: pb_grpc.TokenServiceStub, state: dict[str, str]) -> None:
    """A refresh token that was rotated and whose successor was used (no grace)."""
    state["rotated"] = admin.Issue(pb.IssueRequest(subject="frank")).tokens.refresh_token
    first = admin.Refresh(pb.RefreshRequest(refresh_token=state["rotated"]))
    admin.Refresh(pb.RefreshRequest(refresh_token=first.tokens.refresh_token))


def test_every_audit_event_kind_has_a_counter():
    """An event added to the service without a counter fails here (metrics and audit
    agree by construction: counters are derived from the audit records)."""
    kinds = set()
    for path in (ROOT / "tokensvc").rglob("*.py"):
        source = path.read_text()
        kinds |= set(re.findall(r'audit\.record\(\s*"([a-z_]+)"', source))
        for pair in re.findall(r'event = "([a-z_]+)" if .* else "([a-z_]+)"', source):
            kinds |= set(pair)
        kinds |= set(re.findall(r'\bevent = "([a-z_]+)"$', source, re.MULTILINE))
    assert kinds >= {"issued", "refreshed", "reuse_detected", "denied", "auth_failed"}
    assert "bound_token_misuse" in kinds
    assert kinds <= set(metrics.DISABLED.events)


def test_metrics_endpoint_shows_rpcs_and_state(service, pki):
    port = metrics_port(service)
    admin = stub_for(service, pki, "admin")
    admin.Issue(pb.IssueRequest(subject="gina"))
    fails(
        lambda: admin.Refresh(pb.RefreshRequest(refresh_token="x")), grpc.StatusCode.UNAUTHENTICATED
    )
    kind, samples = scrape(port)
    assert kind.startswith("text/plain; version=0.0.4")
    names = {name for name, _ in samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    issue = f"{pb.DESCRIPTOR.package}.TokenService/Issue"
    refresh = issue.replace("/Issue", "/Refresh")
    rpc = {"rpc_system_name": "grpc"}
    assert (
        value(
            "rpc_server_call_duration_seconds_count",
            **rpc,
            rpc_method=issue,
            rpc_response_status_code="OK",
        )
        == 1
    )
    assert (
        value(
            "rpc_server_call_duration_seconds_count",
            **rpc,
            rpc_method=refresh,
            rpc_response_status_code="UNAUTHENTICATED",
        )
        == 1
    )
    assert value("tokensvc_keys", state="active") == 1
    assert 0 <= value("tokensvc_keys_active_age_seconds") < 3600
    due = value("tokensvc_keys_rotation_due_seconds")
    assert 0 < due <= service.settings.key_rotation_interval
    assert value("tokensvc_feed_watchers") == 0
    # the listener's own connection counts (this scrape holds one connection)
    assert value("tokensvc_http_connections") >= 1
    assert value("tokensvc_http_refused_total") == 0
    assert value("tokensvc_feed_events_held") >= 0
    assert value("tokensvc_feed_resyncs_total") == 0  # the stream kept its history
    for name in (
        "tokensvc_audit_queue_depth",
        "tokensvc_audit_dropped_total",
        "tokensvc_feed_events_sent_total",
    ):
        assert name in names, name
    # never an identifier as a label value
    text = "\n".join(f"{n}{dict(labels)}" for n, labels in samples)
    assert "gina" not in text and "alice" not in text


def test_plain_metrics_listener_serves_metrics_only(service):
    conn = http.client.HTTPConnection("127.0.0.1", metrics_port(service), timeout=10)
    try:
        conn.request("GET", "/.well-known/jwks.json")
        assert conn.getresponse().status == 404
    finally:
        conn.close()


def test_metrics_on_the_https_listener(make_settings, start_server, dev_pki):
    import ssl

    issued = dev_pki["server"]
    srv = start_server(
        make_settings(
            insecure=False, tls_cert=issued.cert, tls_key=issued.key, http_listen="127.0.0.1:0"
        )
    )
    assert srv.running.http is not None
    ctx = ssl.create_default_context(cafile=str(issued.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", srv.running.http.port, timeout=10, context=ctx)
    try:
        conn.request("GET", metrics.METRICS_PATH)
        reply = conn.getresponse()
        assert reply.status == 200 and b"tokensvc_keys{" in reply.read()
        assert reply.getheader("Cache-Control") == "no-store"
    finally:
        conn.close()


def test_nothing_is_measured_without_an_exporter(tokensvc, monkeypatch):
    assert tokensvc.running.metrics is metrics.DISABLED
    assert not metrics.DISABLED.enabled
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert metrics.setup(prometheus=False) is metrics.DISABLED


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver on loopback: keeps each ExportMetricsServiceRequest."""

    received: ClassVar[list[ExportMetricsServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        self.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_export_uses_the_sdk_environment(monkeypatch):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/v1/metrics"
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", url)
        meters = metrics.setup(prometheus=False)
        assert meters.enabled and meters.render is None
        meters.audit_event("reuse_detected", {})
        metrics.shutdown(meters)  # flushes
        names = {
            m.name
            for request in _Collector.received
            for rm in request.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        }
        assert "tokensvc.tokens.reuse_detections" in names
    finally:
        receiver.shutdown()
        receiver.server_close()


class _GrpcCollector(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An OTLP/gRPC receiver on loopback."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def Export(self, request, context):
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                self.names |= {m.name for m in sm.metrics}
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_otlp_grpc_export(monkeypatch):
    collector = _GrpcCollector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
        meters = metrics.setup(prometheus=False)
        meters.audit_event("locked", {})
        metrics.shutdown(meters)
        assert "tokensvc.subjects.locks" in collector.names
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("exporters", "protocol", "expected"),
    [
        ("otlp", "grpc", ["opentelemetry.exporter.otlp.proto.grpc"]),
        (
            "otlp,console",
            "http/protobuf",
            ["opentelemetry.exporter.otlp.proto.http", "opentelemetry.sdk"],
        ),
        ("none", "", []),
    ],
)
def test_exporter_selection_is_the_sdks(monkeypatch, exporters, protocol, expected):
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", exporters)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    readers = metrics._env_readers()
    try:
        modules = [type(r._exporter).__module__ for r in readers]
        assert len(modules) == len(expected)
        assert all(m.startswith(e) for m, e in zip(modules, expected, strict=True)), modules
    finally:
        for reader in readers:
            reader.shutdown()
