"""Two tokensvc replicas on one Redis: families and keys are shared, not per process.

- a refresh token rotated on replica A and presented again on replica B is reuse: the
  family is revoked everywhere;
- the key schedule rotates keys while a client keeps calling a protected service through
  the interceptor with fresh tokens from both replicas: not one call fails.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest

from tokensvc_client import TokenClient
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import b64url_decode

# rotate every 6 s; keys are published 1 s before signing and kept 2 s after retiring
# (access tokens live 2 s: with whole-second NumericDates a 1 s token can be issued with
# a few ms left, which would test the clock, not the rotation)
FAST = {"access_ttl": 2, "jwks_max_age": 1, "leeway": 0, "key_rotation_interval": 6}


def test_reuse_on_another_replica_revokes_the_family(make_settings, start_server):
    settings = make_settings()
    a, b = start_server(settings), start_server(settings)
    stub_a, stub_b = a.stub(), b.stub()
    first = stub_a.Issue(pb.IssueRequest(subject="alice")).tokens
    second = stub_a.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token)).tokens
    with pytest.raises(grpc.RpcError) as err:
        stub_b.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == "reused"
    for stub in (stub_a, stub_b):
        assert not stub.Introspect(pb.IntrospectRequest(token=second.access_token)).active
        with pytest.raises(grpc.RpcError) as err:
            stub.Refresh(pb.RefreshRequest(refresh_token=second.refresh_token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_scheduled_rotation_under_traffic_fails_no_call(
    make_settings, start_server, make_protected, kind
):
    settings = make_settings(**FAST)
    a, b = start_server(settings), start_server(settings)
    protected = make_protected(a, kind)  # its JWKS comes from replica A only
    clients = [TokenClient(a.target, insecure=True), TokenClient(b.target, insecure=True)]
    kids: set[str] = set()
    calls = failures = 0
    deadline = time.monotonic() + 8  # the first rotation is due after 6 s
    try:
        while time.monotonic() < deadline:
            client = clients[calls % 2]
            issued = time.time()
            token = client.issue(f"user{calls}", audience=["mesh"]).access_token
            kids.add(json.loads(b64url_decode(token.split(".")[0]))["kid"])
            try:
                protected.call("unary_unary", (("authorization", f"Bearer {token}"),))
            except grpc.RpcError as err:
                # a 2 s token (whole seconds) can expire if this loop stalls a second on a
                # crowded machine: that is the clock, not the rotation under test
                if err.details() == "invalid token: expired" and time.time() - issued >= 1:
                    continue
                failures += 1
                print("failed:", err.code(), err.details())
            calls += 1
    finally:
        for client in clients:
            client.close()
    assert len(kids) >= 2, "no rotation happened during the run"
    assert calls > 20
    assert failures == 0, f"{failures} of {calls} calls failed across {len(kids)} keys"
