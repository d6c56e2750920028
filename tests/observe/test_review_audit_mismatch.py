"""Review (fixed): a stolen bound token presented by another certificate (RFC 8705
``certificate_mismatch``) was recorded as an ordinary ``auth_failed``: not a security event
(not in ``ts:audit:security``, so refused-call noise could evict it from ``ts:audit``), and
its WARNING line shared the caller-caused log budget (20 ``auth_failed`` lines per 10 s,
all peers together) with garbage any peer can send: another peer's 20 malformed refresh
tokens hid the theft from the log. Now it is the security event ``bound_token_misuse`` and
the log budget is per event and peer. Real mTLS server on loopback, real Redis."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pytest
import redis

from tests.support.waiting import wait_until
from tokensvc.observe.audit import LOG_BURST
from tokensvc.observe.audit_writer import SECURITY_STREAM
from tokensvc_client.peer import certificate_thumbprint
from tokensvc_client.v1 import tokensvc_pb2 as pb

LOGIN = "spiffe://tokensvc.test/ns/auth/sa/login"
POLICY = f'[rpc.Issue]\nallow = ["{LOGIN}"]\n'
MISMATCH = "certificate_mismatch"


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _stolen_refresh(svc) -> tuple[str, str]:
    """A refresh token bound to billing's certificate, and its session id."""
    request = pb.IssueRequest(subject="alice", audience=["mesh"])
    request.cnf_x5t_s256 = certificate_thumbprint(svc.pki["billing"].cert.read_bytes())
    tokens = svc.stub("login").Issue(request).tokens
    return tokens.refresh_token, tokens.session_id


def _noise_then_theft(svc) -> str:
    """Another peer's garbage, then login presents billing's token; returns its session."""
    orders, login = svc.stub("orders"), svc.stub("login")
    stolen, session_id = _stolen_refresh(svc)  # billing's token ...
    for i in range(25):  # ... after another peer's garbage (malformed refresh tokens)
        garbage = pb.RefreshRequest(refresh_token=f"not-a-token-{i}")
        assert _code(lambda g=garbage: orders.Refresh(g)) == grpc.StatusCode.UNAUTHENTICATED
    theft = pb.RefreshRequest(refresh_token=stolen)  # ... presented by login
    assert _code(lambda: login.Refresh(theft)) == grpc.StatusCode.UNAUTHENTICATED
    return session_id


def test_a_stolen_bound_token_is_a_security_event(mtls_service, redis_url):
    svc = mtls_service(POLICY)
    session_id = _noise_then_theft(svc)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        wait_until(  # the refused call is in the trail ...
            lambda: any(f.get("code") == MISMATCH for _id, f in client.xrange("ts:audit")),
            what="the mismatch in ts:audit",
        )
        security = [f for _id, f in client.xrange(SECURITY_STREAM)]
    finally:
        client.close()
    # ... and where noise cannot evict it, as a security event naming thief and session
    (theft,) = [f for f in security if f.get("code") == MISMATCH]
    assert theft["event"] == "bound_token_misuse"
    assert theft["peer"] == LOGIN and theft["session_id"] == session_id
    assert theft["rpc"] == "Refresh"
    assert all(f.get("code") != "malformed" for f in security)  # the noise is not


def test_another_peers_garbage_does_not_hide_a_theft_from_the_log(mtls_service, caplog):
    svc = mtls_service(POLICY)
    with caplog.at_level(logging.INFO, logger="tokensvc.audit"):
        _noise_then_theft(svc)
    lines = [r for r in caplog.records if r.name == "tokensvc.audit"]
    # the noise is logged up to its peer's budget ...
    assert sum(getattr(r, "code", "") == "malformed" for r in lines) == LOG_BURST
    # ... and the theft anyway, as a WARNING
    thefts = [r for r in lines if getattr(r, "code", "") == MISMATCH]
    assert [(r.levelno, getattr(r, "event", "")) for r in thefts] == [
        (logging.WARNING, "bound_token_misuse")
    ], [(r.getMessage(), getattr(r, "code", "")) for r in lines]
