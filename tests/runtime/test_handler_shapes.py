"""Every gRPC handler shape works through the server's wrappers (drain, decoding guard, RPC
metrics: :mod:`tokensvc.handlers`), including grpc.aio's coroutine-style server streaming of
``Health.Watch``; undecodable streamed requests are INVALID_ARGUMENT, never UNKNOWN.

Real servers on loopback, real grpcio clients (one with client-side health checking).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import ServerThread
from tokensvc.api.decoding import NOT_DECODABLE
from tokensvc.config import Settings
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["TokenService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
#: a ServerReflectionRequest whose ``host`` (field 1, a string) is invalid UTF-8
BAD_REFLECTION = b"\x0a\x02\xff\xfe"


def _watch(srv: ServerThread, service: str) -> tuple[grpc.Channel, queue.Queue[Any]]:
    """Watch ``service``'s health; statuses (or the ending RpcError) arrive in the queue."""
    chan = srv.channel()
    seen: queue.Queue[Any] = queue.Queue()
    call = health_pb2_grpc.HealthStub(chan).Watch(health_pb2.HealthCheckRequest(service=service))

    def read() -> None:
        try:
            for response in call:
                seen.put(response.status)
        except grpc.RpcError as err:
            seen.put(err)

    threading.Thread(target=read, daemon=True).start()
    return chan, seen


def test_health_watch_streams_serving_then_not_serving_on_drain(
    make_settings, start_server, caplog
):
    caplog.set_level(logging.INFO)
    srv = start_server(make_settings())
    chan, seen = _watch(srv, SERVICE)
    try:
        assert seen.get(timeout=10) == SERVING
        # the watch is not a call the drain waits for: the stop ends well within its grace
        stopping = threading.Thread(target=srv.stop, kwargs={"grace": 30})
        stopping.start()
        assert seen.get(timeout=10) == NOT_SERVING
        stopping.join(20)
        assert not stopping.is_alive()
    finally:
        chan.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_health_watch_of_an_unknown_service(tokensvc):
    chan, seen = _watch(tokensvc, "no.such.Service")
    try:
        assert seen.get(timeout=10) == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        chan.close()


def test_a_client_with_client_side_health_checking_calls_issue(tokensvc):
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE},
        "methodConfig": [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    options = [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]
    with grpc.insecure_channel(tokensvc.target, options=options) as chan:
        reply = pb_grpc.TokenServiceStub(chan).Issue(pb.IssueRequest(subject="alice"), timeout=15)
    assert reply.tokens.access_token


def _reflect(srv: ServerThread, body: bytes) -> grpc.RpcError:
    with srv.channel() as chan:
        call = chan.stream_stream(REFLECTION)(iter([body]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
    return err.value


def test_reflection_with_invalid_utf8_is_invalid_argument(tokensvc, caplog):
    caplog.set_level(logging.INFO)
    err = _reflect(tokensvc, BAD_REFLECTION)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, NOT_DECODABLE)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_reflection_still_answers_valid_requests(tokensvc):
    from grpc_reflection.v1alpha import reflection_pb2

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with tokensvc.channel() as chan:
        call = chan.stream_stream(
            REFLECTION,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (reply,) = list(call(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert SERVICE in names


def test_watch_revocations_garbage_is_invalid_argument(tokensvc, caplog):
    caplog.set_level(logging.INFO)
    with tokensvc.channel() as chan:
        call = chan.unary_stream(f"/{SERVICE}/WatchRevocations")(b"\x0a\x02\xff\xfe", timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(iter(call))
    assert (err.value.code(), err.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        NOT_DECODABLE,
    )
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_rpc_metrics_time_coroutine_style_streams(
    make_settings: Callable[..., Settings], start_server: Callable[..., ServerThread]
) -> None:
    """The RPC timer wraps Health.Watch too: its stream is recorded when it ends."""
    srv = start_server(make_settings(metrics_listen="127.0.0.1:0"))
    chan, seen = _watch(srv, "")
    assert seen.get(timeout=10) == SERVING
    chan.close()  # the client cancels the stream
    render = srv.running.metrics.render
    assert render is not None
    rendered = ""
    for _ in range(100):
        rendered = render()[0].decode()
        if 'rpc_method="grpc.health.v1.Health/Watch"' in rendered:
            break
        threading.Event().wait(0.05)
    assert 'rpc_method="grpc.health.v1.Health/Watch"' in rendered


def test_the_registrar_remembers_only_methods_the_server_serves():
    """A client calling ever new method names (each answered UNIMPLEMENTED) cannot grow the
    registrar's table of wrapped handlers: only served methods are remembered, once."""
    from tokensvc.handlers import _WrappedGenericHandler

    async def behaviour(request: Any, context: Any) -> bytes:
        return b""

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str) -> None:
            self.method = method
            self.invocation_metadata = ()

    served = grpc.unary_unary_rpc_method_handler(behaviour)
    inner = grpc.method_handlers_generic_handler("s.Svc", {"Get": served})
    wrapped = _WrappedGenericHandler(inner, lambda _method, handler: handler)
    for i in range(1000):
        assert wrapped.service(Details(f"/s.Svc/Other{i}")) is None
    first = wrapped.service(Details("/s.Svc/Get"))
    assert first is served and wrapped.service(Details("/s.Svc/Get")) is first
    assert len(wrapped._built) == 1
