"""Bytes that are not valid protobuf (invalid UTF-8 in a string field, a truncated
message) get INVALID_ARGUMENT "request is not valid protobuf/UTF-8" from every RPC, over
real mTLS, logged once per request at INFO without a traceback."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.support.rpc import refused
from tokensvc.api.decoding import NOT_DECODABLE
from tokensvc.security.policy import DEFAULT_RULES
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
POLICY = "".join(f'[rpc.{rpc}]\nallow = ["{ADMIN}"]\n' for rpc in DEFAULT_RULES)
SERVICE = pb.DESCRIPTOR.services_by_name["TokenService"]
STRING = 9  # FieldDescriptor.TYPE_STRING


def _undecodable(message: object) -> bytes:
    """A request of that type with invalid UTF-8 in its first string field, or, for a
    message without one, a truncated field."""
    for field in message.fields:  # type: ignore[attr-defined]
        if field.type == STRING:
            return bytes([field.number << 3 | 2, 2]) + b"\xff\xfe"
    return b"\x0a\x05ab"  # field 1, length 5, two bytes present


def test_undecodable_requests_are_invalid_argument_on_every_rpc(mtls_service, caplog):
    svc = mtls_service(POLICY)
    admin = svc.pki["admin"]
    with channel(svc.target, ca=admin.ca, cert=admin.cert, key=admin.key) as chan:
        caplog.set_level(logging.INFO)
        _every_rpc(chan, caplog)
        # the service is unharmed, and valid requests decode as before
        assert pb_grpc.TokenServiceStub(chan).Issue(pb.IssueRequest(subject="a")).tokens


def _every_rpc(channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    methods = list(SERVICE.methods)
    assert {m.name for m in methods} >= {"Issue", "Refresh", "Introspect", "WatchRevocations"}
    for method in methods:
        path = f"/{SERVICE.full_name}/{method.name}"
        body = _undecodable(method.input_type)
        if method.server_streaming:
            call = channel.unary_stream(path)(body)
            err = refused(lambda c=call: next(iter(c)))
        else:
            err = refused(lambda p=path, b=body: channel.unary_unary(p)(b))
        assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, NOT_DECODABLE), (
            method.name
        )
    health = refused(
        lambda: channel.unary_unary("/grpc.health.v1.Health/Check")(
            _undecodable(health_pb2.HealthCheckRequest.DESCRIPTOR)
        )
    )
    assert (health.code(), health.details()) == (grpc.StatusCode.INVALID_ARGUMENT, NOT_DECODABLE)
    refusals = [r for r in caplog.records if NOT_DECODABLE in r.getMessage()]
    assert len(refusals) == len(methods) + 1  # once per request
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in refusals)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_refusal_log_carries_no_token(tokensvc, caplog):
    stub_channel = tokensvc.channel()
    secret = "tsr2_" + "a" * 120  # any token-like value in a request that does not parse
    encoded = secret.encode()
    body = bytes([0x0A, len(encoded)]) + encoded + b"\x0a\x02\xff\xfe"
    caplog.set_level(logging.DEBUG)
    err = refused(lambda: stub_channel.unary_unary("/tokensvc.v1.TokenService/Refresh")(body))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, NOT_DECODABLE)
    assert NOT_DECODABLE in caplog.text
    assert secret not in caplog.text and "a" * 40 not in caplog.text
    stub_channel.close()
