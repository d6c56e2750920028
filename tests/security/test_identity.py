"""Caller identity over real mTLS: no certificate can spell another's identity
(docs/security.md, TLS and caller identities).

Every certificate below is signed by the server's client CA, so TLS accepts it; what is
tested is what identity the service derives from it. The admin's SPIFFE ID is allowed to
Issue, LockSubject, ListKeys and ListSessions; certificates that merely *spell* it (in the
common name, next to another URI SAN, in an invalid URI SAN) must get none of them.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.support import audit_entries, events_of
from tokensvc.cli.devcerts import DevCA, Issued
from tokensvc.config import ConfigError, Rate
from tokensvc.security.policy import CallerPolicy
from tokensvc_client.channels import channel
from tokensvc_client.peer import (
    Peer,
    certificate_thumbprint,
    peer_from_auth_context,
    spiffe_id_error,
)
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

ADMIN = "spiffe://tokensvc.test/ns/ops/sa/admin"
ORDERS = "spiffe://tokensvc.test/ns/shop/sa/orders"
RPCS = ("Issue", "LockSubject", "ListKeys", "ListSessions")


def _policy(*identities: str) -> str:
    names = ", ".join(f'"{name}"' for name in identities)
    return "".join(f"[rpc.{rpc}]\nallow = [{names}]\n" for rpc in RPCS)


#: name -> (common name, URI SANs); every one spells ADMIN somewhere, none may be ADMIN
SPOOFS: dict[str, tuple[str, tuple[str, ...]]] = {
    "cn-no-uri": (ADMIN, ()),
    "cn-wrong-uri": (ADMIN, (ORDERS,)),
    "cn-invalid-uri": (ADMIN, ("spiffe://TOKENSVC.test/ns/ops/sa/admin",)),
    "uri-with-port": (ADMIN, ("spiffe://tokensvc.test:443/ns/ops/sa/admin",)),
    "uri-with-query": ("x", (ADMIN + "?x=1",)),
    "two-uris": (ADMIN, (ADMIN, ORDERS)),
    "two-same-uris": (ADMIN, (ADMIN, ADMIN)),
    "cn-spells-cn": ("cn:legacy", ()),
    "cn-with-slash": ("legacy/../admin", ()),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[DevCA, dict[str, Issued]]:
    ca = DevCA(tmp_path_factory.mktemp("pki"))
    certs = {
        "server": ca.issue("server", hosts=("127.0.0.1",), server=True),
        "admin": ca.issue("admin", spiffe_id=ADMIN),
        "legacy": ca.issue("legacy", common_name="legacy"),
    }
    for name, (cn, uris) in SPOOFS.items():
        certs[name] = ca.issue(name, common_name=cn, uris=uris)
    return ca, certs


def _serve(make_settings, start_server, pki, tmp_path: Path, *, cn_identities: bool):
    ca, certs = pki
    policy = tmp_path / "policy.toml"
    policy.write_text(_policy(ADMIN, "cn:legacy") if cn_identities else _policy(ADMIN))
    return start_server(
        make_settings(
            insecure=False,
            tls_cert=certs["server"].cert,
            tls_key=certs["server"].key,
            tls_client_ca=ca.ca_path,
            policy_file=policy,
            allow_cn_identities=cn_identities,
            rate_auth_failures=Rate(0, 1),  # many refusals from one address, on purpose
        )
    )


def _calls(stub: pb_grpc.TokenServiceStub):
    return {
        "Issue": lambda: stub.Issue(pb.IssueRequest(subject="alice")),
        "LockSubject": lambda: stub.LockSubject(pb.LockSubjectRequest(subject="bob")),
        "ListKeys": lambda: stub.ListKeys(pb.ListKeysRequest()),
        "ListSessions": lambda: stub.ListSessions(pb.ListSessionsRequest(subject="alice")),
    }


def _outcomes(srv, ca: DevCA, cert: Issued) -> dict[str, grpc.StatusCode]:
    with channel(f"127.0.0.1:{srv.port}", ca=ca.ca_path, cert=cert.cert, key=cert.key) as chan:
        out = {}
        for rpc, call in _calls(pb_grpc.TokenServiceStub(chan)).items():
            try:
                call()
                out[rpc] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                out[rpc] = err.code()
        return out


ALLOWED = dict.fromkeys(RPCS, grpc.StatusCode.OK)
DENIED = dict.fromkeys(RPCS, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize("cn_identities", [False, True], ids=["default", "cn-enabled"])
def test_no_certificate_spells_another_identity(
    make_settings, start_server, pki, tmp_path, cn_identities
):
    ca, certs = pki
    srv = _serve(make_settings, start_server, pki, tmp_path, cn_identities=cn_identities)
    assert _outcomes(srv, ca, certs["admin"]) == ALLOWED  # the real SVID
    for name in SPOOFS:
        assert _outcomes(srv, ca, certs[name]) == DENIED, name
    # a plain common name is an identity only when the operator enables it, as cn:NAME
    assert _outcomes(srv, ca, certs["legacy"]) == (ALLOWED if cn_identities else DENIED)


def test_a_refused_certificate_is_audited_with_the_reason(
    make_settings, start_server, pki, tmp_path, redis_url
):
    ca, certs = pki
    srv = _serve(make_settings, start_server, pki, tmp_path, cn_identities=True)
    assert _outcomes(srv, ca, certs["two-uris"]) == DENIED
    entries = audit_entries(
        redis_url, lambda e: events_of(e).count("denied") >= len(RPCS), "a denial per RPC"
    )
    refused = [e for e in entries if e["event"] == "identity_refused"]
    assert len(refused) == 1, entries  # once per certificate, not per call
    assert "2 URI SANs" in refused[0]["reason"]
    denied = [e for e in entries if e["event"] == "denied"]
    assert len(denied) == len(RPCS)
    assert all("no identity: " in e["reason"] and "2 URI SANs" in e["reason"] for e in denied)
    assert all(ADMIN not in e["peer"] for e in refused + denied)


def test_common_name_identities_are_namespaced_in_the_audit(
    make_settings, start_server, pki, tmp_path, redis_url
):
    ca, certs = pki
    srv = _serve(make_settings, start_server, pki, tmp_path, cn_identities=True)
    assert _outcomes(srv, ca, certs["legacy"])["Issue"] is grpc.StatusCode.OK
    entries = audit_entries(redis_url, lambda e: "issued" in events_of(e), "an issued event")
    issued = [e for e in entries if e["event"] == "issued"]
    assert issued[0]["peer"] == "cn:legacy"


def test_policy_with_common_names_needs_the_flag(make_settings, pki, tmp_path):
    ca, certs = pki
    policy = tmp_path / "policy.toml"
    policy.write_text(_policy(ADMIN, "cn:legacy"))
    settings = make_settings(
        insecure=False,
        tls_cert=certs["server"].cert,
        tls_key=certs["server"].key,
        tls_client_ca=ca.ca_path,
        policy_file=policy,
    )
    with pytest.raises(ConfigError, match=r"cn:legacy.*--allow-cn-identities"):
        CallerPolicy.for_settings(settings)


@pytest.mark.parametrize(
    "entry", ["legacy-login", "spiffe://Example.org/x", "spiffe://x/a/", "cn:"]
)
def test_policy_refuses_entries_that_are_no_identity(entry):
    with pytest.raises(ConfigError, match="is not an identity"):
        CallerPolicy.from_toml(f'[rpc.Issue]\nallow = ["{entry}"]\n')


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("spiffe://example.org", None),
        ("spiffe://example.org/ns/a-b/sa/c_d.e", None),
        ("spiffe://ex-ample.org/A/B/C", None),
        ("SPIFFE://example.org/a", "scheme"),
        ("https://example.org/a", "scheme"),
        ("spiffe:///a", "trust domain is empty"),
        ("spiffe://Example.org/a", "trust domain"),
        ("spiffe://example.org:8443/a", "trust domain"),
        ("spiffe://user@example.org/a", "trust domain"),
        ("spiffe://example.org/a/", "empty segment"),
        ("spiffe://example.org//a", "empty segment"),
        ("spiffe://example.org/a/../b", "'.' or '..'"),
        ("spiffe://example.org/./b", "'.' or '..'"),
        ("spiffe://example.org/a?b=c", "characters"),
        ("spiffe://example.org/a#frag", "characters"),
        ("spiffe://example.org/a%2Fb", "characters"),
        ("spiffe://example.org/" + "a" * 2040, "longer than 2048"),
    ],
)
def test_spiffe_id_rules(value, error):
    found = spiffe_id_error(value)
    if error is None:
        assert found is None
    else:
        assert found is not None and error in found


def test_each_certificate_is_read_once_and_identity_is_stable(pki):
    _ca, certs = pki
    pem = certs["admin"].cert.read_bytes()
    first = peer_from_auth_context({"x509_pem_cert": [pem]})
    again = peer_from_auth_context({"x509_pem_cert": [bytes(pem)]})
    assert first is again  # the cached reading, not a second parse
    assert first == Peer(ADMIN, certificate_thumbprint(pem))
    spoof = peer_from_auth_context({"x509_pem_cert": [certs["two-uris"].cert.read_bytes()]})
    assert (spoof.identity, spoof.thumbprint) == ("", "") and "2 URI SANs" in spoof.refused
    # gRPC's own fields are not trusted: only the certificate counts
    forged = {
        "x509_pem_cert": [certs["cn-no-uri"].cert.read_bytes()],
        "peer_spiffe_id": [ADMIN.encode()],
        "x509_common_name": [ADMIN.encode()],
    }
    assert peer_from_auth_context(forged).identity == ""
