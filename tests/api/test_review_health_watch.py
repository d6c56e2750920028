"""Review (fixed): ``Health.Watch`` was the one long-lived stream a client could open
without a per-client cap. WatchRevocations (``--max-watchers-per-client``) and reflection
(``--max-reflection-per-client``) refuse a client's streams beyond a few; Health.Watch is
open to every caller (no caller policy; anonymous ones too where client certificates are
optional), is not counted by the drain, and accepts any service name (an unknown one is
answered SERVICE_UNKNOWN and the stream stays open), so one client could hold up to
``--max-connections`` x ``--max-concurrent-streams`` (10 000 x 100) of them. Now
``--max-health-watches-per-client`` caps them; Health.Check is unaffected, and a channel
with client-side health checking still works. Real mTLS server on loopback."""

from __future__ import annotations

import json

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import wait_until
from tokensvc.api.health import TOO_MANY
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

CAP = 4  # the per-client cap every long-lived stream gets in this test
STREAMS = 3 * CAP
ORDERS = "spiffe://tokensvc.test/ns/shop/sa/orders"
SERVICE = pb.DESCRIPTOR.services_by_name["TokenService"].full_name


def _channel(svc, workload: str, **options: object) -> grpc.Channel:
    mine = svc.pki[workload]
    return channel(svc.target, ca=mine.ca, cert=mine.cert, key=mine.key, **options)


def _health_watches(svc):
    return svc.server.running.health.watches


def test_health_watch_streams_are_capped_per_client(mtls_service):
    svc = mtls_service(
        "",
        max_watchers_per_client=CAP,
        max_reflection_per_client=CAP,
        max_health_watches_per_client=CAP,
    )
    chan = _channel(svc, "orders")  # any workload (Health has no caller policy)
    calls = []
    codes: list[tuple[grpc.StatusCode, str | None]] = []
    try:
        stub = health_pb2_grpc.HealthStub(chan)
        for i in range(STREAMS):
            # any service name is accepted: unknown ones stay open as SERVICE_UNKNOWN
            call = stub.Watch(health_pb2.HealthCheckRequest(service=f"no-such-{i}"), timeout=30)
            calls.append(call)
            try:
                first = next(call)
                assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            except grpc.RpcError as err:
                codes.append((err.code(), err.details()))
        # the client holds its cap; every stream beyond it is refused
        assert codes == [(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_MANY)] * (STREAMS - CAP)
        assert _health_watches(svc).open_streams(ORDERS) == CAP
        # Health.Check is a unary call: unaffected
        check = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        # another client watches meanwhile
        with _channel(svc, "billing") as other:
            watch = health_pb2_grpc.HealthStub(other).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=30
            )
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        # a closed stream frees its place
        calls[0].cancel()
        wait_until(lambda: _health_watches(svc).open_streams(ORDERS) == CAP - 1)
        again = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        calls.append(again)
        assert next(again).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for call in calls:
            call.cancel()
        chan.close()
    wait_until(lambda: _health_watches(svc).open_streams(ORDERS) == 0, what="all released")


def test_client_side_health_checking_works_and_holds_one_watch(mtls_service):
    svc = mtls_service(f'[rpc.Issue]\nallow = ["{ORDERS}"]\n', max_health_watches_per_client=2)
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
    }
    options = [("grpc.service_config", json.dumps(config))]
    with _channel(svc, "orders", options=options) as chan:
        reply = pb_grpc.TokenServiceStub(chan).Issue(pb.IssueRequest(subject="alice"), timeout=15)
        assert reply.tokens.access_token
        # the channel's health check is one Watch of this client, within the cap
        assert _health_watches(svc).open_streams(ORDERS) == 1
