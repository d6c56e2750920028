"""The caller policy over real mTLS: which workload may call which RPC
(docs/security.md, The caller policy)."""

from __future__ import annotations

import json

import grpc
import pytest

from tests.support import MtlsService, audit_entries, events_of
from tests.support.rpc import code_of
from tokensvc.cli.devcerts import DevCA
from tokensvc.config import ConfigError
from tokensvc.security.policy import CallerPolicy
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

LOGIN = "spiffe://tokensvc.test/ns/auth/sa/login"
ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
POLICY = f"""
[rpc.Issue]
allow = ["{LOGIN}"]

[rpc.Revoke]
allow = ["{LOGIN}", "{ADMIN}"]

[rpc.LockSubject]
allow = ["{ADMIN}"]
"""


def test_default_policy_opens_only_keys_refresh_and_introspect(mtls_service):
    svc: MtlsService = mtls_service("")
    orders = svc.stub("orders")
    assert orders.GetKeys(pb.GetKeysRequest()).jwks
    assert not orders.Introspect(pb.IntrospectRequest(token="x.y.z")).active
    refused = orders.Refresh
    assert code_of(lambda: refused(pb.RefreshRequest(refresh_token="tsr1_x"))) == (
        grpc.StatusCode.UNAUTHENTICATED  # admitted: the refresh token is the credential
    )
    for call in (
        lambda: orders.Issue(pb.IssueRequest(subject="alice")),
        lambda: orders.Revoke(pb.RevokeRequest(subject="alice")),
        lambda: orders.LockSubject(pb.LockSubjectRequest(subject="alice")),
        lambda: orders.UnlockSubject(pb.UnlockSubjectRequest(subject="alice")),
    ):
        assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED
    # even the login workload is nobody until the policy lists it
    assert (
        code_of(lambda: svc.stub("login").Issue(pb.IssueRequest(subject="alice")))
        == grpc.StatusCode.PERMISSION_DENIED
    )


def test_listed_identities_may_call_what_the_policy_grants(mtls_service):
    svc = mtls_service(POLICY)
    login, admin, orders = svc.stub("login"), svc.stub("admin"), svc.stub("orders")
    pair = login.Issue(pb.IssueRequest(subject="alice")).tokens
    assert orders.Introspect(pb.IntrospectRequest(token=pair.access_token)).active
    assert orders.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)).tokens.access_token
    assert (
        code_of(lambda: orders.Issue(pb.IssueRequest(subject="mallory")))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert (
        code_of(lambda: login.LockSubject(pb.LockSubjectRequest(subject="alice")))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert admin.Revoke(pb.RevokeRequest(session_id=pair.session_id)).revoked_sessions == 1
    assert admin.LockSubject(pb.LockSubjectRequest(subject="alice")).revoked_sessions == 0


def test_a_denied_call_is_audited_with_the_peer_identity(mtls_service, redis_url):
    svc = mtls_service(POLICY)
    stub = svc.stub("orders")
    assert (
        code_of(lambda: stub.Issue(pb.IssueRequest(subject="alice")))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    entries = audit_entries(redis_url, lambda e: "denied" in events_of(e), "a denied event")
    denied = [e for e in entries if e.get("event") == "denied"]
    assert denied[0]["peer"] == "spiffe://tokensvc.test/ns/shop/sa/orders"
    assert "Issue" in denied[0]["reason"]


def test_common_name_is_an_identity_only_when_enabled(make_settings, start_server, tmp_path):
    ca = DevCA(tmp_path / "pki")
    server = ca.issue("server", hosts=("127.0.0.1",), server=True)
    legacy = ca.issue("legacy", common_name="legacy-login")
    other = ca.issue("other", common_name="other")
    policy = tmp_path / "policy.toml"
    policy.write_text('[rpc.Issue]\nallow = ["cn:legacy-login"]\n')
    srv = start_server(
        make_settings(
            insecure=False,
            tls_cert=server.cert,
            tls_key=server.key,
            tls_client_ca=ca.ca_path,
            policy_file=policy,
            allow_cn_identities=True,
        )
    )
    target = f"127.0.0.1:{srv.port}"
    with channel(target, ca=ca.ca_path, cert=legacy.cert, key=legacy.key) as chan:
        assert pb_grpc.TokenServiceStub(chan).Issue(pb.IssueRequest(subject="alice")).tokens
    with channel(target, ca=ca.ca_path, cert=other.cert, key=other.key) as chan:
        stub = pb_grpc.TokenServiceStub(chan)
        code = code_of(lambda: stub.Issue(pb.IssueRequest(subject="alice")))
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_tls_without_client_ca_has_no_identities(make_settings, start_server, dev_pki):
    srv = start_server(
        make_settings(
            insecure=False, tls_cert=dev_pki["server"].cert, tls_key=dev_pki["server"].key
        )
    )
    with channel(f"127.0.0.1:{srv.port}", ca=dev_pki["server"].ca) as chan:
        stub = pb_grpc.TokenServiceStub(chan)
        assert stub.GetKeys(pb.GetKeysRequest()).jwks  # open to anyone
        assert (
            code_of(lambda: stub.Introspect(pb.IntrospectRequest(token="a.b.c")))
            == grpc.StatusCode.PERMISSION_DENIED  # needs an authenticated peer
        )
        assert (
            code_of(lambda: stub.Issue(pb.IssueRequest(subject="alice")))
            == grpc.StatusCode.PERMISSION_DENIED
        )


def test_policy_defaults_and_wildcards():
    policy = CallerPolicy.from_toml(
        '[rpc.Issue]\nallow = ["*"]\n[rpc.Introspect]\nanonymous = true\n'
    )
    from tokensvc_client.peer import ANONYMOUS, Peer

    someone = Peer("spiffe://x/y", "t" * 43)
    assert policy.admits("Issue", someone) and not policy.admits("Issue", ANONYMOUS)
    assert policy.admits("Introspect", ANONYMOUS)
    assert policy.admits("GetKeys", ANONYMOUS) and policy.admits("Refresh", ANONYMOUS)
    assert not policy.admits("Revoke", someone)
    assert not policy.admits("NoSuchRpc", someone)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[rpc.Isue]\nallow = ["a"]\n', "unknown RPC 'Isue'"),
        ('[rpc.Issue]\nalow = ["a"]\n', "unknown key"),
        ('[rpc.Issue]\nallow = "a"\n', "list of non-empty identity strings"),
        ('[rpc.Issue]\nallow = [""]\n', "list of non-empty identity strings"),
        ("[rpc.Issue]\nanonymous = 1\n", "true or false"),
        ('[rules.Issue]\nallow = ["a"]\n', "unknown table"),
        ("[rpc.Issue\n", "not valid TOML"),
    ],
)
def test_policy_mistakes_stop_the_start(text, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("[", r"\[")):
        CallerPolicy.from_toml(text)


def test_a_bad_policy_file_refuses_to_start(make_settings, dev_pki, tmp_path):
    import asyncio

    from tokensvc.runtime import server

    bad = tmp_path / "policy.toml"
    bad.write_text('[rpc.Isue]\nallow = ["x"]\n')
    settings = make_settings(
        insecure=False,
        tls_cert=dev_pki["server"].cert,
        tls_key=dev_pki["server"].key,
        policy_file=bad,
    )
    with pytest.raises(ConfigError, match="Isue"):
        asyncio.run(server.start(settings))


def test_audit_entries_never_carry_tokens(mtls_service, redis_url):
    svc = mtls_service(POLICY)
    login = svc.stub("login")
    pair = login.Issue(pb.IssueRequest(subject="alice")).tokens
    new = login.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)).tokens
    with pytest.raises(grpc.RpcError) as err:
        login.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))  # reuse
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    login.Revoke(pb.RevokeRequest(token=new.access_token))
    wanted = {"issued", "refreshed", "reuse_detected", "revoked"}
    entries = audit_entries(redis_url, lambda e: wanted <= set(events_of(e)), str(wanted))
    dump = json.dumps(entries)
    for access in (pair.access_token, new.access_token):
        assert access not in dump and access.split(".")[2] not in dump
    for refresh in (pair.refresh_token, new.refresh_token):
        assert refresh not in dump and refresh.rsplit("_", 1)[1] not in dump  # the secret part


def test_the_example_policy_matches_the_development_pki():
    from pathlib import Path

    policy = CallerPolicy.from_file(
        Path(__file__).resolve().parents[2] / "examples" / "policy.toml"
    )
    from tokensvc.cli.devcerts import DEFAULT_WORKLOADS
    from tokensvc_client.peer import Peer

    login, admin = Peer(DEFAULT_WORKLOADS["login"], "t"), Peer(DEFAULT_WORKLOADS["admin"], "t")
    assert policy.admits("Issue", login) and not policy.admits("Issue", admin)
    assert policy.admits("LockSubject", admin) and not policy.admits("LockSubject", login)
