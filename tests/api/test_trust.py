"""Trust: a relay is never locked out by failures it cannot prevent, and the audit trail
cannot be flooded or have its security events evicted. Real Redis, real gRPC over mTLS."""

from __future__ import annotations

import asyncio
import json

import grpc
import redis
import redis.asyncio as aioredis

from tests.support import wait_until
from tests.support.rpc import code_of
from tokensvc.config import Rate
from tokensvc.observe.audit import AuditTrail
from tokensvc.observe.audit_tail import tail
from tokensvc.observe.audit_writer import AUDIT_STREAM, SECURITY_STREAM
from tokensvc.store.calls import script_source
from tokensvc_client.channels import channel
from tokensvc_client.peer import certificate_thumbprint
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc

ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
LOGIN = "spiffe://tokensvc.test/ns/auth/sa/login"
ORDERS = "spiffe://tokensvc.test/ns/shop/sa/orders"
POLICY = f"""
[rpc.Issue]
allow = ["{LOGIN}"]
[rpc.LockSubject]
allow = ["{ADMIN}"]
"""
#: a small per-user budget: the abuser is over it after 4 tries
FEW = Rate(3, 60)


def _issue(svc, subject: str, bound_to: str | None = None, **fields) -> pb.TokenPair:
    request = pb.IssueRequest(subject=subject, audience=["mesh", "tokensvc"], **fields)
    if bound_to:
        request.cnf_x5t_s256 = certificate_thumbprint(svc.pki[bound_to].cert.read_bytes())
    return svc.stub("login").Issue(request).tokens


def _refresh(token: str) -> pb.RefreshRequest:
    return pb.RefreshRequest(refresh_token=token)


# -- item 1: a relay is not locked out by its users' failures -----------------------------


def test_a_stolen_bound_refresh_token_through_a_relay_limits_only_the_thief(mtls_service):
    svc = mtls_service(POLICY, rate_auth_failures=FEW)
    login, billing = svc.stub("login"), svc.stub("billing")
    stolen = _issue(svc, "alice", bound_to="billing")  # billing's; sent through login
    bob = _issue(svc, "bob")
    for _ in range(4):  # past the per-user burst of 3
        assert code_of(lambda: login.Refresh(_refresh(stolen.refresh_token))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    # the abuser is limited ...
    assert code_of(lambda: login.Refresh(_refresh(stolen.refresh_token))) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    # ... the relay's other users refresh through it as usual, and the holder too
    assert login.Refresh(_refresh(bob.refresh_token)).tokens.refresh_token
    assert billing.Refresh(_refresh(stolen.refresh_token)).tokens.refresh_token


def test_a_stolen_bound_access_token_for_list_sessions_limits_only_the_thief(mtls_service):
    svc = mtls_service(POLICY, rate_auth_failures=FEW)
    login = svc.stub("login")
    stolen = _issue(svc, "alice", bound_to="billing")
    carol = _issue(svc, "carol")
    for _ in range(4):
        assert (
            code_of(
                lambda: login.ListSessions(
                    pb.ListSessionsRequest(subject="alice"),
                    metadata=(("authorization", f"Bearer {stolen.access_token}"),),
                )
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )
    assert (
        code_of(
            lambda: login.ListSessions(
                pb.ListSessionsRequest(subject="alice"),
                metadata=(("authorization", f"Bearer {stolen.access_token}"),),
            )
        )
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    own = (("authorization", f"Bearer {carol.access_token}"),)
    assert login.ListSessions(pb.ListSessionsRequest(subject="carol"), metadata=own).sessions
    assert login.Refresh(_refresh(carol.refresh_token)).tokens.refresh_token


def test_one_anonymous_clients_failures_do_not_block_its_network(
    mtls_service, make_settings, start_server, dev_pki, tmp_path
):
    # a TLS replica without client certificates on the same Redis: every caller is
    # anonymous, counted per network (all of 127.0.0.0/8 is one)
    svc = mtls_service(POLICY, rate_auth_failures=FEW)  # issues the tokens
    policy = tmp_path / "anonymous-policy.toml"
    policy.write_text(POLICY)
    public = start_server(
        make_settings(
            insecure=False,
            tls_cert=dev_pki["server"].cert,
            tls_key=dev_pki["server"].key,
            policy_file=policy,
            rate_auth_failures=FEW,
        )
    )

    def anonymous() -> tokensvc_pb2_grpc.TokenServiceStub:
        chan = channel(public.target, ca=dev_pki["server"].ca)
        opened.append(chan)
        return tokensvc_pb2_grpc.TokenServiceStub(chan)

    opened: list[grpc.Channel] = []
    abuser, neighbour = anonymous(), anonymous()
    stolen = _issue(svc, "alice", bound_to="billing")
    dave, erin = _issue(svc, "dave"), _issue(svc, "erin")
    try:
        for _ in range(25):  # denied calls: far past the limit
            assert code_of(lambda: abuser.Issue(pb.IssueRequest(subject="x"))) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
        assert neighbour.Refresh(_refresh(dave.refresh_token)).tokens.refresh_token
        for _ in range(4):  # tries with a stolen bound token
            assert code_of(lambda: abuser.Refresh(_refresh(stolen.refresh_token))) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        assert code_of(lambda: abuser.Refresh(_refresh(stolen.refresh_token))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert neighbour.Refresh(_refresh(erin.refresh_token)).tokens.refresh_token
        assert abuser.Refresh(_refresh(_issue(svc, "frank").refresh_token)).tokens
    finally:
        for chan in opened:
            chan.close()


# -- item 2: the trail cannot be flooded or erased -----------------------------------------


def _records(url: str, stream: str = AUDIT_STREAM) -> list[dict[str, str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [fields for _id, fields in client.xrange(stream)]
    finally:
        client.close()


def test_a_refused_workload_in_a_loop_adds_no_record_per_call(mtls_service, redis_url):
    svc = mtls_service(POLICY, rate_auth_failures=FEW)
    orders, login = svc.stub("orders"), svc.stub("login")
    calls = 60
    for _ in range(calls):
        assert code_of(lambda: orders.Issue(pb.IssueRequest(subject="x"))) == (
            grpc.StatusCode.PERMISSION_DENIED  # the answer stays the same
        )
    reuse = _issue(svc, "alice")
    login.Refresh(_refresh(reuse.refresh_token))
    reused = code_of(lambda: login.Refresh(_refresh(reuse.refresh_token)))
    assert reused == grpc.StatusCode.UNAUTHENTICATED  # reuse: family revoked
    wait_until(
        lambda: any(r["event"] == "reuse_detected" for r in _records(redis_url)),
        what="reuse_detected in the trail",
    )
    mine = [r for r in _records(redis_url) if r.get("peer") == ORDERS]
    # the 4 calls within the burst and the one over it, and one rate_limited record
    assert len(mine) <= 8, [r["event"] for r in mine]
    assert sum(r["event"] == "rate_limited" for r in mine) == 1
    # a periodic count of the calls refused without a record each
    running = svc.server.running
    svc.server.loop.call_soon_threadsafe(running.audit.report_suppressed)
    wait_until(
        lambda: any(r["event"] == "suppressed" for r in _records(redis_url)),
        what="a suppressed record",
    )
    suppressed = [r for r in _records(redis_url) if r["event"] == "suppressed"]
    assert suppressed[0]["peer"] == ORDERS and suppressed[0]["reason"] == "denied"
    assert int(suppressed[0]["calls"]) + sum(r["event"] == "denied" for r in mine) == calls


def test_warning_lines_of_caller_caused_events_are_rate_limited(redis_url, caplog):
    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url)
        trail = AuditTrail(r)
        with caplog.at_level("INFO", logger="tokensvc.audit"):
            for i in range(200):
                trail.record("denied", peer="spiffe://x/y", reason=f"Issue: r{i}")
            trail.record("reuse_detected", session_id="s1")
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    lines = [r for r in caplog.records if r.name == "tokensvc.audit"]
    assert sum(r.getMessage() == "audit denied" for r in lines) == 20
    assert any(r.getMessage() == "audit reuse_detected" for r in lines)  # always logged
    assert len(_records(redis_url)) == 201  # the stream has every record


def _tail(url: str, **kwargs) -> list[dict[str, str]]:
    lines: list[str] = []

    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        try:
            await tail(r, write=lines.append, **kwargs)
        finally:
            await r.aclose()

    asyncio.run(main())
    return [json.loads(line) for line in lines]


def test_noise_cannot_evict_a_security_event(redis_url):
    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url)
        trail = AuditTrail(r, maxlen=10)
        trail.record("reuse_detected", subject="alice", session_id="s1")
        for i in range(2000):
            trail.record("denied", peer="spiffe://x/y", reason=f"Issue: r{i}")
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    noisy = _records(redis_url)
    assert all(r["event"] == "denied" for r in noisy)  # evicted from the capped trail
    kept = _tail(redis_url, security=True)
    assert [(e["event"], e["session_id"]) for e in kept] == [("reuse_detected", "s1")]
    assert [r["event"] for r in _records(redis_url, SECURITY_STREAM)] == ["reuse_detected"]


def test_security_tail_reads_what_the_previous_version_wrote(redis_url):
    # the previous version wrote every record to ts:audit only, with this script
    old = redis.Redis.from_url(redis_url)
    append = old.register_script(script_source("audit_append.lua"))
    legacy = [
        {"event": "revoked", "session_id": "old1", "ts": "1"},
        {"event": "issued", "subject": "alice", "ts": "2"},
        {"event": "locked", "subject": "mallory", "ts": "3"},
    ]
    args: list[object] = [100_000]
    for entry in legacy:
        args.append(len(entry))
        for pair in entry.items():
            args.extend(pair)
    append(keys=[AUDIT_STREAM], args=args)
    old.close()

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_url)
        trail = AuditTrail(r)
        trail.record("reuse_detected", session_id="new1")
        trail.record("denied", peer="spiffe://x/y", reason="Issue: policy")
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    security = _tail(redis_url, security=True)
    assert [e["event"] for e in security] == ["revoked", "locked", "reuse_detected"]
    assert [e["event"] for e in _tail(redis_url, count=2, security=True)] == [
        "locked",
        "reuse_detected",
    ]
    everything = _tail(redis_url)  # the plain tail reads ts:audit as before
    assert [e["event"] for e in everything] == [
        "revoked", "issued", "locked", "reuse_detected", "denied",
    ]  # fmt: skip
