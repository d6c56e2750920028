"""ListSessions and session revocation end to end: the backend of a session-management
page ("your devices", "log out everywhere") and its CLI."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import redis

from tests.support import wait_until
from tokensvc.cli.main import main as cli_main
from tokensvc.config import Rate
from tokensvc.families.tokens import tag_of
from tokensvc.store import sessions_key
from tokensvc_client.v1 import tokensvc_pb2 as pb

ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
LOGIN = "spiffe://tokensvc.test/ns/auth/sa/login"
POLICY = f"""
[rpc.Issue]
allow = ["{LOGIN}"]
[rpc.ListSessions]
allow = ["{ADMIN}"]
[rpc.Revoke]
allow = ["{ADMIN}"]
"""


def _sessions(stub, subject: str, **kw) -> dict[str, pb.Session]:
    reply = stub.ListSessions(pb.ListSessionsRequest(subject=subject), **kw)
    return {s.session_id: s for s in reply.sessions}


def test_list_shows_each_device_and_revocations_show_up_next_time(stub):
    laptop = stub.Issue(
        pb.IssueRequest(subject="alice", client_id="web", session_label="laptop")
    ).tokens
    phone = stub.Issue(
        pb.IssueRequest(subject="alice", client_id="ios", session_label="phone")
    ).tokens
    stub.Issue(pb.IssueRequest(subject="bob"))
    time.sleep(0.01)  # into a later millisecond: the times compared below are the server's
    stub.Refresh(pb.RefreshRequest(refresh_token=phone.refresh_token))

    listed = _sessions(stub, "alice")
    assert set(listed) == {laptop.session_id, phone.session_id}
    one = listed[phone.session_id]
    assert (one.client_id, one.session_label, one.active) == ("ios", "phone", True)
    assert one.last_refreshed_at.ToMilliseconds() > one.created_at.ToMilliseconds()
    assert one.expires_at.ToSeconds() - one.created_at.ToSeconds() == pytest.approx(
        30 * 86400, abs=2
    )  # the family's absolute end, not the refresh token's idle expiry

    stub.Revoke(pb.RevokeRequest(session_id=laptop.session_id))
    listed = _sessions(stub, "alice")
    assert not listed[laptop.session_id].active and listed[phone.session_id].active

    stub.Revoke(pb.RevokeRequest(subject="alice"))  # log out everywhere
    assert not any(s.active for s in _sessions(stub, "alice").values())
    assert all(s.active for s in _sessions(stub, "bob").values())


def test_expired_sessions_are_pruned(make_settings, start_server, redis_url):
    stub = start_server(make_settings(family_max_age=1, refresh_idle_ttl=1)).stub()
    tag = tag_of(stub.Issue(pb.IssueRequest(subject="carol")).tokens.session_id)
    assert len(_sessions(stub, "carol")) == 1
    wait_until(lambda: not _sessions(stub, "carol"), 5, what="carol's sessions pruned")
    assert redis.Redis.from_url(redis_url).zcard(sessions_key(tag)) == 0


def test_a_subject_lists_its_own_sessions_with_its_own_token(mtls_service):
    svc = mtls_service(POLICY)
    login, orders, admin = svc.stub("login"), svc.stub("orders"), svc.stub("admin")
    own = ["mesh", "tokensvc"]  # the user's token names tokensvc itself too
    alice = login.Issue(
        pb.IssueRequest(subject="alice", session_label="tablet", audience=own)
    ).tokens
    bob = login.Issue(pb.IssueRequest(subject="bob", audience=own)).tokens

    def bearer(token: str):
        return (("authorization", f"Bearer {token}"),)

    # a user-facing service (not an admin) forwards the user's own token
    mine = _sessions(orders, "alice", metadata=bearer(alice.access_token))
    assert [s.session_label for s in mine.values()] == ["tablet"]
    refusals = [
        (lambda: _sessions(orders, "alice"), grpc.StatusCode.PERMISSION_DENIED),
        (
            lambda: _sessions(orders, "alice", metadata=bearer(bob.access_token)),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            lambda: _sessions(orders, "alice", metadata=bearer(alice.refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    ]
    for call, code in refusals:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code
    assert _sessions(admin, "alice")  # an admin identity needs no token
    # a revoked token lists nothing any more
    admin.Revoke(pb.RevokeRequest(session_id=alice.session_id))
    with pytest.raises(grpc.RpcError) as err:
        _sessions(orders, "alice", metadata=bearer(alice.access_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sessions_cli_lists_and_revokes(tokensvc, capsys):
    stub = tokensvc.stub()
    pair = stub.Issue(pb.IssueRequest(subject="dave", session_label="desktop")).tokens
    target = ["--target", tokensvc.target, "--insecure", "--output", "json"]
    assert cli_main(["sessions", "list", "dave", *target]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["session_id"], r["session_label"], r["active"]) for r in rows] == [
        (pair.session_id, "desktop", True)
    ]
    assert cli_main(["sessions", "revoke", pair.session_id, *target]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "revoked_sessions": 1,
        "revoked_access_tokens": 0,
    }
    assert cli_main(["sessions", "list", "dave", *target]) == 0
    assert json.loads(capsys.readouterr().out)["active"] is False

    stub.Issue(pb.IssueRequest(subject="dave"))
    assert cli_main(["revoke", "--subject", "dave", *target]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "revoked_sessions": 1,
        "revoked_access_tokens": 0,
    }
    assert cli_main(["sessions", "list", "nobody", *target]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["sessions", "list", "", *target]) == 1  # INVALID_ARGUMENT
    assert "subject" in capsys.readouterr().err


def test_a_stolen_bound_token_lists_nothing(mtls_service, dev_pki):
    from tokensvc_client.peer import certificate_thumbprint

    svc = mtls_service(POLICY)
    thumb = certificate_thumbprint(dev_pki["orders"].cert.read_bytes())
    request = pb.IssueRequest(subject="erin", cnf_x5t_s256=thumb, audience=["tokensvc"])
    pair = svc.stub("login").Issue(request).tokens
    bearer = (("authorization", f"Bearer {pair.access_token}"),)
    assert _sessions(svc.stub("orders"), "erin", metadata=bearer)  # its own workload
    with pytest.raises(grpc.RpcError) as err:
        _sessions(svc.stub("billing"), "erin", metadata=bearer)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def test_a_token_minted_for_another_service_lists_nothing(mtls_service):
    # a token alice sent to "orders" (aud mesh) cannot be replayed by orders to list her
    # sessions: self-service needs a token whose aud names tokensvc itself
    svc = mtls_service(POLICY)
    login, orders = svc.stub("login"), svc.stub("orders")
    elsewhere = login.Issue(pb.IssueRequest(subject="alice", audience=["orders"])).tokens
    default = login.Issue(pb.IssueRequest(subject="alice")).tokens  # the default aud, mesh
    for token in (elsewhere.access_token, default.access_token):
        with pytest.raises(grpc.RpcError) as err:
            _sessions(orders, "alice", metadata=_bearer(token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "wrong_audience" in (err.value.details() or "")
    own = login.Issue(pb.IssueRequest(subject="alice", audience=["orders", "tokensvc"])).tokens
    assert len(_sessions(orders, "alice", metadata=_bearer(own.access_token))) == 3


def test_tokensvc_own_audience_is_configurable(mtls_service):
    svc = mtls_service(POLICY, self_audience="https://tokensvc.example")
    login, orders = svc.stub("login"), svc.stub("orders")
    plain = login.Issue(pb.IssueRequest(subject="bob", audience=["tokensvc"])).tokens
    with pytest.raises(grpc.RpcError) as err:
        _sessions(orders, "bob", metadata=_bearer(plain.access_token))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    own = login.Issue(pb.IssueRequest(subject="bob", audience=["https://tokensvc.example"]))
    assert _sessions(orders, "bob", metadata=_bearer(own.tokens.access_token))


def test_garbage_naming_a_subject_never_locks_it_out_of_its_own_sessions(mtls_service):
    # the self-service path is open to every workload: failures count against the subject
    # whose token the signature proves, never against a subject the caller merely names
    svc = mtls_service(POLICY, rate_auth_failures=Rate(3, 60))
    login, orders, billing = svc.stub("login"), svc.stub("orders"), svc.stub("billing")
    alice = login.Issue(pb.IssueRequest(subject="alice", audience=["tokensvc"])).tokens
    head, _, signature = alice.access_token.rpartition(".")
    forged = f"{head}.{signature[:10]}{'B' if signature[10] == 'A' else 'A'}{signature[11:]}"
    for token in ["garbage"] * 3 + [forged] * 3:  # well past the burst of 3
        with pytest.raises(grpc.RpcError) as err:
            _sessions(billing, "alice", metadata=_bearer(token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _sessions(orders, "alice", metadata=_bearer(alice.access_token))
