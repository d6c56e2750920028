"""Property tests of the verifier as a parser of hostile input (no server needed).

* No mutation of a valid token is accepted unless it gives the original string back:
  canonical base64url leaves exactly one accepted spelling. (The ECDSA twin (r, n - s) is
  out of reach of random mutation; test_attacks.py has it as ``signature-high-s-twin``.)
  The same holds for the interceptors' decision (:meth:`Authenticator.decide`, stepped
  with a KeySet as the interceptors step it) on ``authorization`` values: one is accepted
  only if it is ``Bearer``, in any case, then one or more spaces (RFC 6750 2.1), then
  exactly the original token.
* Whatever the input, the verifier raises :class:`InvalidToken` and nothing else, and
  whatever it accepts satisfies every claim rule; the decision reaches the same verdict.
"""

from __future__ import annotations

import re
import string
from typing import Any

import grpc
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk

from tests.attacks.forge import DROP, EcKey, apply_changes, b64url, valid_claims
from tests.attacks.targets import decide
from tokensvc.families.tokens import sign_access_token
from tokensvc_client._auth import Authenticator
from tokensvc_client._rejection import Rejection
from tokensvc_client.errors import InvalidToken
from tokensvc_client.verifier import Claims, KeySet, Verifier, b64url_decode

ISSUER = "https://tokensvc.test"
AUDIENCE = "mesh"
KID = "mutation-key"
NOW = 1_800_000_000
KEY = jwk.JWK.generate(kty="EC", crv="P-256", kid=KID)
KEYS = KeySet.of([KEY])
VERIFIER = Verifier(ISSUER, AUDIENCE, clock=lambda: NOW)
CLAIMS = valid_claims(issuer=ISSUER, audience=AUDIENCE, session_id="0" * 64, now=NOW)
TOKEN = sign_access_token(KEY, KID, CLAIMS)
SIGNER = EcKey.from_jwk(KEY, KID)
#: The interceptors' decision, its own verifier pinned to the same instant.
AUTH = Authenticator(Verifier(ISSUER, AUDIENCE, clock=lambda: NOW))
#: The only accepted spellings of the original credential (RFC 6750 2.1, RFC 7235 2.1).
ORIGINAL_CREDENTIAL = re.compile("(?ai:bearer) +" + re.escape(TOKEN))

fast = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

BASE64URL = string.ascii_letters + string.digits + "-_"
# Mostly characters that survive the alphabet check, so mutations reach the later rules.
chars = st.one_of(
    st.sampled_from(BASE64URL),
    st.sampled_from(".=+/ \t\n\x00"),
    st.characters(),
)


def test_the_unmutated_token_is_accepted() -> None:
    """The control: without it every property below would hold vacuously."""
    assert VERIFIER.verify(TOKEN, KEYS).raw == CLAIMS


@st.composite
def char_mutation(draw: st.DrawFn, token: str) -> str:
    """One edit of the token's text (an empty text can only grow)."""
    if not token:
        return draw(chars)
    op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap", "segments"]))
    i = draw(st.integers(0, len(token) - 1))
    if op == "replace":
        return token[:i] + draw(chars) + token[i + 1 :]
    if op == "insert":
        return token[:i] + draw(chars) + token[i:]
    if op == "delete":
        return token[:i] + token[i + 1 :]
    if op == "truncate":
        return token[:i]
    if op == "swap":
        j = draw(st.integers(0, len(token) - 1))
        edited = list(token)
        edited[i], edited[j] = edited[j], edited[i]
        return "".join(edited)
    parts = token.split(".")
    order = draw(st.lists(st.sampled_from(range(len(parts))), min_size=1, max_size=5))
    return ".".join(parts[k] for k in order)


@st.composite
def byte_mutation(draw: st.DrawFn, token: str) -> str:
    """One edit of a segment's decoded bytes, re-encoded canonically (gets past base64)."""
    parts = token.split(".")
    index = draw(st.integers(0, 2))
    data = bytearray(b64url_decode(parts[index]))
    op = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate"]))
    i = draw(st.integers(0, len(data) - 1))
    if op == "flip":
        data[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "replace":
        data[i] = draw(st.integers(0, 255))
    elif op == "insert":
        data.insert(i, draw(st.integers(0, 255)))
    elif op == "delete":
        del data[i]
    else:
        del data[i:]
    parts[index] = b64url(bytes(data))
    return ".".join(parts)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """An optional byte-level edit, then up to two text edits; at least one edit."""
    token = draw(byte_mutation(TOKEN)) if draw(st.booleans()) else TOKEN
    for _ in range(draw(st.integers(1 if token == TOKEN else 0, 2))):
        token = draw(char_mutation(token)) if token else draw(chars)
    return token


@fast
@given(mutated())
def test_no_mutation_of_a_valid_token_is_accepted(token: str) -> None:
    assume(token != TOKEN)
    try:
        claims = VERIFIER.verify(token, KEYS)
    except InvalidToken:
        return
    raise AssertionError(f"a second spelling verifies: {token!r} -> {claims}")


def decision_of(value: str) -> Claims | Rejection:
    """The decision on a call with ``authorization: <value>``, keys answered with KEYS."""
    outcome, _ = decide(AUTH, (("authorization", value),), KEYS)
    return outcome


def _assert_refused(outcome: Claims | Rejection, value: str) -> None:
    assert isinstance(outcome, Rejection), f"a second spelling passes: {value!r}"
    assert outcome.code is grpc.StatusCode.UNAUTHENTICATED
    assert outcome.message.startswith("invalid token: ")


def test_the_unmutated_token_passes_the_decision() -> None:
    """The control of the decision properties."""
    for value in ("Bearer " + TOKEN, "bearer   " + TOKEN):
        outcome = decision_of(value)
        assert isinstance(outcome, Claims) and outcome.raw == CLAIMS


@fast
@given(mutated())
def test_no_mutation_of_a_valid_token_passes_the_decision(token: str) -> None:
    assume(token != TOKEN)
    value = "Bearer " + token
    outcome = decision_of(value)
    if ORIGINAL_CREDENTIAL.fullmatch(value):  # spaces before the token: a wider separator
        event("separator")
        assert isinstance(outcome, Claims)
        return
    _assert_refused(outcome, value)


SCHEMES = st.sampled_from(["Bearer", "bearer", "BEARER", "Bearer:", "Basic", "Token", "", "B"])
SEPARATORS = st.sampled_from([" ", "  ", "", "\t", ",", " \t", "="])


@st.composite
def authorization_values(draw: st.DrawFn) -> str:
    """A scheme, a separator and the token (perhaps mutated), then perhaps one more text
    edit anywhere in the whole value."""
    token = draw(st.one_of(st.just(TOKEN), mutated()))
    value = draw(SCHEMES) + draw(SEPARATORS) + token
    if draw(st.booleans()):
        value = draw(char_mutation(value))
    return value


@fast
@given(authorization_values())
def test_an_authorization_value_passes_only_if_it_carries_the_original_token(
    value: str,
) -> None:
    outcome = decision_of(value)
    if ORIGINAL_CREDENTIAL.fullmatch(value):
        event("accepted")
        assert isinstance(outcome, Claims) and outcome.raw == CLAIMS
        return
    _assert_refused(outcome, value)


@fast
@given(st.text())
def test_arbitrary_text_only_ever_raises_invalid_token(text: str) -> None:
    try:
        VERIFIER.verify(text, KEYS)
    except InvalidToken:
        return
    raise AssertionError("arbitrary text verified")


@fast
@given(st.lists(st.one_of(st.binary(max_size=80).map(b64url), st.text(max_size=40)), max_size=6))
def test_arbitrary_segments_only_ever_raise_invalid_token(segments: list[str]) -> None:
    try:
        VERIFIER.verify(".".join(segments), KEYS)
    except InvalidToken:
        return
    raise AssertionError("arbitrary segments verified")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# A replacement value for a member: usually one of the right type and near the valid
# one (so that a good share of examples is accepted, and the "accepted => every rule
# holds" side is really tested), otherwise arbitrary JSON or removal.
times = st.integers(NOW - 120, NOW + 120) | st.sampled_from([0, -1, 2**53 - 1, 2**53])
short_text = st.text(max_size=8)
CLAIM_VALUES = {
    "iss": st.sampled_from([ISSUER, ISSUER + "/", ""]),
    "sub": short_text,
    "aud": st.sampled_from([AUDIENCE, [AUDIENCE], ["x", AUDIENCE], ["x"], [], ""]),
    "exp": times,
    "iat": times,
    "nbf": times,
    "auth_time": times,
    "jti": short_text,
    "sid": short_text,
    "client_id": short_text,
    "acr": short_text,
    "roles": st.lists(short_text, max_size=3),
    "amr": st.lists(short_text, max_size=3),
    "cnf": st.fixed_dictionaries({"x5t#S256": short_text}),
    "extra": json_values,
}
HEADER_VALUES = {
    "alg": st.sampled_from(["ES256", "es256", "none", "HS256", "RS256"]),
    "typ": st.sampled_from(["at+jwt", "AT+JWT", "application/at+jwt", "JWT", "at+jwt ", "jwt"]),
    "kid": st.sampled_from([KID, KID.upper(), KID + " ", ""]),
    **dict.fromkeys(["jwk", "jku", "x5u", "x5c", "crit", "zip", "b64", "cty"], json_values),
}


@st.composite
def member_edits(draw: st.DrawFn, values: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(values)), unique=True, max_size=3))
    return {
        name: draw(st.one_of(values[name], values[name], json_values, st.just(DROP)))
        for name in names
    }


HEADER = {"alg": "ES256", "typ": "at+jwt", "kid": KID}


def _verify_or_reason(header: dict[str, Any], claims: dict[str, Any]) -> Claims | None:
    """Verify a token signed with the right key, so it reaches the header and claim rules;
    the interceptors' decision on the same token must reach the same verdict."""
    token = SIGNER.sign(header, claims)
    decided = decision_of("Bearer " + token)
    try:
        verified = VERIFIER.verify(token, KEYS)
    except InvalidToken as err:
        event(f"rejected: {err.reason.value}")
        assert decided == Rejection.invalid_token(err.reason)
        return None
    event("accepted")
    assert decided == verified
    return verified


@fast
@given(member_edits(HEADER_VALUES))
def test_an_accepted_header_is_exactly_alg_typ_kid(edits: dict[str, Any]) -> None:
    header = apply_changes(HEADER, edits)
    if _verify_or_reason(header, CLAIMS) is None:
        return
    assert set(header) == {"alg", "typ", "kid"}
    assert header["alg"] == "ES256" and header["kid"] == KID
    assert isinstance(header["typ"], str)
    assert header["typ"].lower() in ("at+jwt", "application/at+jwt")


@fast
@given(member_edits(CLAIM_VALUES))
def test_accepted_claims_satisfy_every_claim_rule(edits: dict[str, Any]) -> None:
    claims = _verify_or_reason(HEADER, apply_changes(CLAIMS, edits))
    if claims is None:
        return
    assert claims.issuer == ISSUER and AUDIENCE in claims.audience and claims.subject
    assert claims.not_before <= NOW + VERIFIER.leeway and claims.issued_at <= NOW + VERIFIER.leeway
    assert NOW < claims.expires_at < 2**53
    assert all(isinstance(v, str) for v in (claims.token_id, claims.session_id, claims.client_id))
    assert claims.token_id and claims.session_id
    assert all(isinstance(v, str) for v in (*claims.roles, *claims.amr))
