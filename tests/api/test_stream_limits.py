"""Every stream a client can open is bounded: server reflection is subject to the caller
policy (admin identities and loopback callers by default, a ``[rpc.ServerReflectionInfo]``
table replaces that) and capped per client; the gRPC server has a per-connection stream cap
and a connection cap. Real mTLS servers on loopback, small caps."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from tokensvc.api.reflection import DENIED, TOO_MANY
from tokensvc.config import Settings
from tokensvc.runtime.draining import stream_limits
from tokensvc_client.channels import channel

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"


class Reflection:
    """One open reflection stream of a workload (each on a connection of its own)."""

    def __init__(self, svc, workload: str) -> None:
        mine = svc.pki[workload]
        self.closed = threading.Event()
        self.chan = channel(svc.target, ca=mine.ca, cert=mine.cert, key=mine.key)
        self.call = self.chan.stream_stream(
            REFLECTION,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )(iter(self._requests()), timeout=30)

    def _requests(self):
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        self.closed.wait(30)  # keep the stream open until the test closes it

    def first(self) -> reflection_pb2.ServerReflectionResponse:
        return next(self.call)

    def close(self) -> None:
        self.closed.set()
        self.call.cancel()
        self.chan.close()


def _refused(stream: Reflection) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stream.first()
    return err.value


def test_reflection_is_capped_per_client_while_others_are_served(mtls_service):
    svc = mtls_service("", max_reflection_per_client=3)
    streams = [Reflection(svc, "admin") for _ in range(3)]
    try:
        for stream in streams:
            assert stream.first().list_services_response.service
        extra = Reflection(svc, "admin")
        streams.append(extra)
        err = _refused(extra)
        assert (err.code(), err.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_MANY)
        # another client (a loopback caller: allowed by default) is served meanwhile
        other = Reflection(svc, "orders")
        streams.append(other)
        assert other.first().list_services_response.service
        # a closed stream frees its place
        streams[0].close()
        again = None
        for _ in range(50):
            again = Reflection(svc, "admin")
            streams.append(again)
            try:
                again.first()
                break
            except grpc.RpcError as refused:
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.05)  # until the server has seen the close
        else:
            pytest.fail("a closed reflection stream never freed its place")
    finally:
        for stream in streams:
            stream.close()


def test_a_policy_table_decides_who_may_use_reflection(mtls_service):
    svc = mtls_service(f'[rpc.ServerReflectionInfo]\nallow = ["{ADMIN}"]\n')
    admin, orders = Reflection(svc, "admin"), Reflection(svc, "orders")
    try:
        assert admin.first().list_services_response.service
        err = _refused(orders)  # loopback, but the table names only the admin
        assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, DENIED)
    finally:
        admin.close()
        orders.close()


def test_stream_and_connection_caps_are_server_options(make_settings):
    settings: Settings = make_settings(max_concurrent_streams=3, max_connections=50)
    assert dict(stream_limits(settings)) == {
        "grpc.max_concurrent_streams": 3,
        "grpc.max_allowed_incoming_connections": 50,
    }
    with pytest.raises(Exception, match="--max-concurrent-streams"):
        make_settings(max_concurrent_streams=0)
