"""How the attacks are refused, not only that they are: cheap checks first, no key work.

No timings (the machines are shared); the order of the checks is shown by what they leave
behind instead:

* tokens refused for their size, header or ``alg`` never reach the key lookup: a
  :class:`KeySet` that records its lookups sees none, and the decision asks for no newer
  key set;
* over the wire, such tokens cause no JWKS fetch even at a moment when an unknown ``kid``
  would (the control);
* a flood of unknown kids costs at most one fetch per ``min_refetch_interval`` of the
  interceptor's :class:`JwksCache` (the fetch function is counted);
* JSON nested at any depth a token can hold is refused or accepted, never raises.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import grpc
import pytest
from jwcrypto import jwk

from tests.attacks.forge import Forge, b64url, json_bytes
from tests.attacks.targets import KINDS, Answer, Protected, bearer, decide
from tests.attacks.test_attacks import CASES, Case
from tokensvc_client._auth import Authenticator
from tokensvc_client._rejection import Rejection
from tokensvc_client.errors import Reason
from tokensvc_client.jwks import DEFAULT_MIN_REFETCH_INTERVAL
from tokensvc_client.verifier import Claims, KeySet

#: Reasons decided from the token's size, prefix and header alone.
BEFORE_KEY_LOOKUP = {
    Reason.TOO_LARGE,
    Reason.REFRESH_AS_ACCESS,
    Reason.BAD_HEADER,
    Reason.BAD_ALGORITHM,
    Reason.BAD_TYPE,
}
EARLY = [case for case in CASES if case.reason in BEFORE_KEY_LOOKUP]


class RecordingKeySet(KeySet):
    """The same keys; every lookup by ``kid`` is recorded."""

    __slots__ = ("lookups",)

    def __init__(self, keys: KeySet) -> None:
        super().__init__({kid: keys.get(kid) for kid in keys.kids})
        self.lookups: list[str] = []

    def get(self, kid: str) -> jwk.JWK | None:
        self.lookups.append(kid)
        return super().get(kid)


def refused(reason: Reason) -> Answer:
    return Answer(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {reason.value}")


def unknown_kid(f: Forge) -> str:
    """A token signed by the real key under a kid nobody published."""
    return f.sign(f.header(kid=secrets.token_urlsafe(16)))


# -- no key lookup -----------------------------------------------------------------------


def test_the_recording_key_set_sees_the_lookup_of_a_valid_token(
    forge: Forge, authenticator: Authenticator, keyset: KeySet
) -> None:
    """The control of the next test: a lookup is recorded when there is one."""
    keys = RecordingKeySet(keyset)
    outcome, _ = decide(authenticator, bearer(forge.valid()), keys)
    assert isinstance(outcome, Claims)
    assert keys.lookups and set(keys.lookups) == {forge.key.kid}


@pytest.mark.parametrize("case", EARLY, ids=[case.name for case in EARLY])
def test_refused_before_any_key_lookup(
    case: Case, forge: Forge, authenticator: Authenticator, keyset: KeySet
) -> None:
    """Size cap, refresh prefix, header members (zip, crit, jwk, jku, x5u, x5c, ...), alg
    and typ: all refused without looking up a key, so without any key work at all."""
    keys = RecordingKeySet(keyset)
    outcome, requests = decide(authenticator, bearer(case.build(forge)), keys)
    assert case.reason is not None
    assert outcome == Rejection.invalid_token(case.reason)
    assert keys.lookups == []
    assert all(request.lacking is None for request in requests)


# -- JWKS fetches over the wire ----------------------------------------------------------

KEY_SOURCE_HEADERS: dict[str, Callable[[Forge], dict[str, object]]] = {
    "jku": lambda f: {"jku": "https://attacker.example/jwks.json"},
    "x5u": lambda f: {"x5u": "https://attacker.example/cert.pem"},
    "x5c": lambda f: {"x5c": [b64url(f.attacker.self_signed_cert_der())]},
    "jwk": lambda f: {"jwk": f.attacker.public_jwk},
    "zip": lambda f: {"zip": "DEF"},
    "crit": lambda f: {"crit": ["exp"]},
}


@pytest.mark.parametrize("kind", KINDS)
def test_header_attacks_with_unknown_kids_cause_no_fetch_even_when_one_is_due(
    kind: str, forge: Forge, make_protected: Callable[[str], Protected]
) -> None:
    """Each token names a kid nobody published, at a moment when an unknown kid may cause a
    refetch (the control, last); refused as bad_header (or too_large) first, none does."""
    protected = make_protected(kind)
    protected.clock.advance(DEFAULT_MIN_REFETCH_INTERVAL + 1)
    tokens = [
        forge.sign(forge.header(kid=forge.attacker.kid, **members(forge)), key=forge.attacker)
        for members in KEY_SOURCE_HEADERS.values()
    ]
    big = forge.sign(
        forge.header(kid=forge.attacker.kid),
        forge.claims(client_id="x" * (1 << 20)),
        key=forge.attacker,
    )
    answers = protected.call_all([*tokens, big])
    assert answers == [refused(Reason.BAD_HEADER)] * len(tokens) + [refused(Reason.TOO_LARGE)]
    assert len(protected.fetches) == 1  # the start-up fetch
    assert protected.call(unknown_kid(forge)) == refused(Reason.UNKNOWN_KEY)
    assert len(protected.fetches) == 2
    assert protected.runs == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_flood_of_unknown_kids_costs_one_fetch_per_interval(
    kind: str, forge: Forge, make_protected: Callable[[str], Protected]
) -> None:
    protected = make_protected(kind)
    flood = 24

    def wave() -> None:
        answers = protected.call_all([unknown_kid(forge) for _ in range(flood)])
        assert answers == [refused(Reason.UNKNOWN_KEY)] * flood

    wave()  # within the interval of the start-up fetch
    assert len(protected.fetches) == 1
    protected.clock.advance(DEFAULT_MIN_REFETCH_INTERVAL)
    wave()
    assert len(protected.fetches) == 2
    protected.clock.advance(DEFAULT_MIN_REFETCH_INTERVAL / 2)
    wave()
    assert len(protected.fetches) == 2
    protected.clock.advance(DEFAULT_MIN_REFETCH_INTERVAL / 2)
    wave()
    assert len(protected.fetches) == 3
    if kind == "sync":  # fetched in a worker thread, never on gRPC's polling thread
        assert all(name.startswith("attacks-worker") for name in protected.fetches[1:])
    # the keys survived the flood: a valid token is still served
    answer = protected.call(forge.valid())
    assert answer.code is grpc.StatusCode.OK and protected.runs == [kind]
    assert len(protected.fetches) == 3


# -- nesting -----------------------------------------------------------------------------


def _nested_in(part: str, depth: int, f: Forge) -> str:
    nested = b"[" * depth + b"]" * depth
    if part == "payload":
        return f.sign(payload=json_bytes(f.claims())[:-1] + b',"ext":' + nested + b"}")
    header = json_bytes(f.header())[:-1] + b',"ext":' + nested + b"}"
    return f.sign(header=header)


@pytest.mark.parametrize(
    ("part", "deep_reason", "shallow"),
    [("payload", Reason.MALFORMED, None), ("header", Reason.MALFORMED, Reason.BAD_HEADER)],
)
def test_nesting_at_every_depth_a_token_can_hold_is_decided_never_raised(
    part: str,
    deep_reason: Reason,
    shallow: Reason | None,
    forge: Forge,
    authenticator: Authenticator,
    keyset: KeySet,
) -> None:
    """Every depth up to the size cap, through the interceptors' decision: below the JSON
    decoder's recursion limit the token is judged on its content, above it malformed;
    a RecursionError (or anything else) escaping would fail the test."""
    seen = set()
    for depth in range(1, 2100):
        token = _nested_in(part, depth, forge)
        if len(token) > 4096:
            break
        outcome, _ = decide(authenticator, bearer(token), keyset)
        if shallow is None and isinstance(outcome, Claims):
            seen.add(None)
            continue
        assert isinstance(outcome, Rejection), (depth, outcome)
        assert outcome in (
            Rejection.invalid_token(deep_reason),
            *([Rejection.invalid_token(shallow)] if shallow else []),
        ), (depth, outcome)
        seen.add(outcome.message.removeprefix("invalid token: "))
    else:
        pytest.fail("no depth reached the size cap")
    # both sides of the decoder's limit were reached
    assert seen == {shallow.value if shallow else None, deep_reason.value}
