"""Tokens the service issues verify with an independent JOSE library (PyJWT).

Guards against a service whose tokens only its own verifier understands: a sidecar or
gateway verifying with the published JWKS must reach the same verdict.
"""

from __future__ import annotations

import json

import jwt
import pytest

from tests.support import ServerThread
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc
from tokensvc_client.verifier import KeySet, Verifier

AUDIENCE = "mesh"


@pytest.fixture
def issued_pair(service_stub: tokensvc_pb2_grpc.TokenServiceStub) -> pb.TokenPair:
    request = pb.IssueRequest(subject="carol", client_id="cli", roles=["reader", "writer"])
    return service_stub.Issue(request).tokens


def test_an_issued_access_token_verifies_with_pyjwt(
    issued_pair: pb.TokenPair, jwks: str, service: ServerThread
) -> None:
    token = issued_pair.access_token
    key_set = jwt.PyJWKSet.from_json(jwks)
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256"
    assert header["kid"] in {key.key_id for key in key_set.keys}

    claims = jwt.decode(
        token,
        key_set[header["kid"]],
        algorithms=["ES256"],
        audience=AUDIENCE,
        issuer=service.settings.issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
    )

    assert claims["sub"] == "carol" and claims["sid"] == issued_pair.session_id
    assert claims["roles"] == ["reader", "writer"] and claims["client_id"] == "cli"
    ours = Verifier(service.settings.issuer, AUDIENCE).verify(token, KeySet.from_jwks(jwks))
    assert dict(ours.raw) == claims


def test_pyjwt_rejects_the_token_for_another_audience_or_issuer(
    issued_pair: pb.TokenPair, jwks: str, service: ServerThread
) -> None:
    """The same verdicts as our Verifier on the claims PyJWT checks too."""
    key = jwt.PyJWKSet.from_json(jwks)[jwt.get_unverified_header(issued_pair.access_token)["kid"]]
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(issued_pair.access_token, key, algorithms=["ES256"], audience="billing")
    with pytest.raises(jwt.InvalidIssuerError):
        jwt.decode(
            issued_pair.access_token,
            key,
            algorithms=["ES256"],
            audience=AUDIENCE,
            issuer="https://attacker.example",
        )


def test_the_published_jwks_is_usable_by_pyjwt_as_is(jwks: str) -> None:
    """Every published key is a public ES256 signing key PyJWT accepts without help."""
    published = json.loads(jwks)["keys"]
    key_set = jwt.PyJWKSet.from_json(jwks)
    assert len(key_set.keys) == len(published) >= 1
    for key in key_set.keys:
        assert key.algorithm_name == "ES256" and key.key_type == "EC"
        assert not hasattr(key.key, "private_numbers")
