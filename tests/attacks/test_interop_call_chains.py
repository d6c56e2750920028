"""Exchanged access tokens and Transaction Tokens verify with an independent JOSE library
(PyJWT), carrying every claim the drafts require (RFC 8693 for ``act``;
draft-ietf-oauth-transaction-tokens-10, "Txn-Token Format", for Transaction Tokens)."""

from __future__ import annotations

import json
import uuid

import jwt
import pytest

from tests.support.chains import DOMAIN, GATEWAY, ORDERS, POLICY, write_chain_pki
from tokensvc_client.v1 import tokensvc_pb2 as pb

#: the claims the draft marks REQUIRED
TXN_REQUIRED = ["iat", "aud", "exp", "txn", "sub", "scope", "req_wl"]


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory):
    return write_chain_pki(tmp_path_factory.mktemp("chain-pki"))


@pytest.fixture
def svc(mtls_service):
    return mtls_service(POLICY, trust_domain=DOMAIN)


def _key(svc, token: str) -> jwt.PyJWK:
    jwks = svc.stub("orders").GetKeys(pb.GetKeysRequest()).jwks
    return jwt.PyJWKSet.from_json(jwks)[jwt.get_unverified_header(token)["kid"]]


def _user(svc) -> pb.TokenPair:
    request = pb.IssueRequest(subject="alice", roles=["orders:read"], audience=["shop"])
    return svc.stub("login").Issue(request).tokens


def test_a_transaction_token_verifies_with_pyjwt(svc):
    user = _user(svc)
    minted = svc.stub("gateway").MintTransactionToken(
        pb.MintTransactionTokenRequest(
            subject_token=user.access_token,
            scope=["orders:read"],
            request_details=json.dumps({"action": "BUY", "quantity": "100"}),
            request_context=json.dumps({"req_ip": "203.0.113.7"}),
        )
    )
    token = minted.txn_token
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "txntoken+jwt" and header["alg"] == "ES256" and header["kid"]
    claims = jwt.decode(
        token,
        _key(svc, token),
        algorithms=["ES256"],
        audience=DOMAIN,
        issuer=svc.server.settings.issuer,
        options={"require": TXN_REQUIRED},
    )
    assert claims["aud"] == DOMAIN  # a string: the trust domain
    assert str(uuid.UUID(claims["txn"])) == claims["txn"] == minted.txn
    assert claims["sub"] == "alice" and claims["scope"] == "orders:read"
    assert claims["req_wl"] == GATEWAY
    assert isinstance(claims["iat"], int) and claims["iat"] < claims["exp"]
    assert claims["tctx"] == {"action": "BUY", "quantity": "100"}
    assert claims["rctx"] == {"req_ip": "203.0.113.7"}
    assert user.access_token not in token  # the draft: never carries the access token
    # another trust domain is another audience for PyJWT as well
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, _key(svc, token), algorithms=["ES256"], audience="elsewhere.test")


def test_an_exchanged_token_verifies_with_pyjwt(svc):
    user = _user(svc)
    first = svc.stub("gateway").Exchange(
        pb.ExchangeRequest(subject_token=user.access_token, audience=["orders"])
    )
    second = svc.stub("orders").Exchange(
        pb.ExchangeRequest(subject_token=first.access_token, audience=["billing"])
    )
    token = second.access_token
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = jwt.decode(
        token,
        _key(svc, token),
        algorithms=["ES256"],
        audience="billing",
        issuer=svc.server.settings.issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "sid", "act"]},
    )
    assert claims["sub"] == "alice" and claims["sid"] == user.session_id
    assert claims["act"] == {"sub": ORDERS, "act": {"sub": GATEWAY}}  # RFC 8693 4.1
    assert set(claims["cnf"]) == {"x5t#S256"}
