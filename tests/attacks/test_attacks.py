"""Attack regression table (docs/design.md, Verification rules).

Every case builds one hostile token and states what each target must do with it:

* the client's :class:`Verifier`, with the KeySet built from GetKeys' JWKS, rejects it with
  the stated :class:`Reason` (or accepts it, for the few spellings the RFCs allow);
* the interceptors' decision (:meth:`Authenticator.decide`, in process, with that KeySet)
  refuses ``authorization: Bearer <token>`` with UNAUTHENTICATED ``invalid token: <reason>``,
  and asks for a newer key set only for an unknown ``kid``;
* :class:`AuthInterceptor` and :class:`AioAuthInterceptor`, each in front of a real gRPC
  server on loopback fed by the real GetKeys, refuse the call with that status and message
  before the handler runs, and fetch no keys for it. Two kinds of case differ on the
  wire: a token with characters no HTTP/2 header may carry never leaves the gRPC client,
  and spaces before a token are the separator of ``Bearer 1*SP token`` (RFC 6750 2.1);
* the server's Introspect answers normally with ``active=False``: never INTERNAL. It gives
  INVALID_ARGUMENT only for what fails request validation (longer than 4096 characters,
  empty, not printable ASCII) -- or, for a request over the service's gRPC message cap
  (the 1 MB tokens), gRPC itself answers RESOURCE_EXHAUSTED before Introspect runs --
  reports a refresh token as one (RFC 7662), and -- by design,
  its verifier accepting any audience -- reports a token for another audience as active,
  leaving the audience check to the caller.

Unless a case says otherwise its token is signed by the server's *real* key and breaks
exactly one rule, so the rejection proves that rule is enforced and not merely that forged
signatures fail.
"""

from __future__ import annotations

import enum
import json
import secrets
import socket
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from jwcrypto import jwe, jwk

from tests.attacks.forge import (
    DROP,
    P256_ORDER,
    EcKey,
    Forge,
    b64url,
    der_of,
    json_bytes,
    noncanonical,
    raw_rs,
    rs_of,
    segment,
    signature_of,
    split,
    with_segment,
    with_signature,
)
from tests.attacks.targets import Answer, Protected, bearer, decide
from tokensvc_client._auth import Authenticator
from tokensvc_client._rejection import Rejection
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc
from tokensvc_client.verifier import Claims, KeySet, Verifier

Stub = tokensvc_pb2_grpc.TokenServiceStub


class Seen(enum.Enum):
    """What Introspect answered."""

    INACTIVE = "active=False"
    ACTIVE = "an active access token"
    REFRESH = "an active refresh token"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    #: The request is over the service's gRPC message cap: refused by gRPC itself.
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"


def introspect(stub: Stub, token: str) -> Seen:
    try:
        answer = stub.Introspect(pb.IntrospectRequest(token=token), timeout=10)
    except grpc.RpcError as err:
        if err.code() is grpc.StatusCode.INVALID_ARGUMENT:
            return Seen.INVALID_ARGUMENT
        if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Seen.RESOURCE_EXHAUSTED
        pytest.fail(f"Introspect failed with {err.code().name}: {err.details()}")
    if not answer.active:
        return Seen.INACTIVE
    return {"access": Seen.ACTIVE, "refresh": Seen.REFRESH}[answer.token_type]


class Wire(enum.Enum):
    """What the interceptors do, when it is not simply the Verifier's verdict."""

    LIKE_VERIFIER = "the Verifier's verdict"
    #: Not a legal HTTP/2 header value (only 0x20-0x7E are): the gRPC client refuses to
    #: send the call (INTERNAL "Invalid metadata"). The decision would say ``reason``.
    UNSENDABLE = "never sent"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Forge], str]
    #: The Verifier's verdict; ``None`` means it accepts the token.
    reason: Reason | None
    #: Introspect's verdict when it is not the one implied by ``reason``.
    introspect: Seen | None = None
    #: The interceptors' verdict when it is not ``reason`` (``None``: they accept).
    interceptor: Reason | Wire | None = Wire.LIKE_VERIFIER

    @property
    def decision_answer(self) -> Reason | None:
        """The verdict of :meth:`Authenticator.decide` on ``Bearer <token>``."""
        return self.reason if isinstance(self.interceptor, Wire) else self.interceptor

    @property
    def wire_answer(self) -> Reason | Wire | None:
        """What a caller of the protected service gets."""
        if self.interceptor is Wire.LIKE_VERIFIER:
            return self.reason
        return self.interceptor

    @property
    def introspect_answer(self) -> Seen:
        if self.introspect is not None:
            return self.introspect
        if self.reason in (None, Reason.WRONG_AUDIENCE):
            return Seen.ACTIVE
        if self.reason is Reason.TOO_LARGE:
            return Seen.INVALID_ARGUMENT
        return Seen.INACTIVE


ACCEPTED = None


# -- builders too long for a lambda ------------------------------------------------------


def _with_rs(r: int | None = None, s: int | None = None) -> Callable[[Forge], str]:
    """A valid token whose r and/or s are replaced."""

    def build(f: Forge) -> str:
        token = f.valid()
        real_r, real_s = rs_of(signature_of(token))
        return with_signature(token, raw_rs(real_r if r is None else r, real_s if s is None else s))

    return build


def _high_s_twin(f: Forge) -> str:
    """(r, n - s) is a second valid ECDSA signature of the same input."""
    token = f.valid()
    r, s = rs_of(signature_of(token))
    return with_signature(token, raw_rs(r, P256_ORDER - s))


def _resized_signature(reshape: Callable[[bytes], bytes]) -> Callable[[Forge], str]:
    def build(f: Forge) -> str:
        token = f.valid()
        return with_signature(token, reshape(signature_of(token)))

    return build


def _zero_padded(size: int) -> Callable[[bytes], bytes]:
    """R || S with each half left-padded to ``size`` bytes: the same integers, so a decoder
    that splits any byte string in half (as jwcrypto does) would verify it."""
    return lambda sig: raw_rs(*rs_of(sig), size=size)


def _tampered_payload(f: Forge) -> str:
    token = f.valid()
    return with_segment(token, 1, b64url(json_bytes(f.claims(sub="admin", roles=["admin"]))))


def _tampered_header(f: Forge) -> str:
    token = f.valid()
    reordered = {"kid": f.key.kid, "typ": "at+jwt", "alg": "ES256"}
    return with_segment(token, 0, b64url(json_bytes(reordered)))


def _bit_flip(f: Forge) -> str:
    token = f.valid()
    sig = bytearray(signature_of(token))
    sig[20] ^= 0x01
    return with_signature(token, bytes(sig))


def _spliced_signature(f: Forge) -> str:
    return with_segment(f.valid(), 2, split(f.valid())[2])


def _noncanonical(index: int) -> Callable[[Forge], str]:
    """Segment ``index`` spelled with a non-zero unused trailing bit (same bytes)."""

    def build(f: Forge) -> str:
        for pad in range(4):
            token = f.sign(payload=f.claims(client_id="web" + "x" * pad))
            if len(split(token)[index]) % 4:
                return with_segment(token, index, noncanonical(split(token)[index]))
        raise AssertionError("no segment length with spare bits")

    return build


def _standard_alphabet(f: Forge) -> str:
    """The signature in standard base64 ('+' and '/' instead of '-' and '_')."""
    for _ in range(100):
        token = f.valid()
        sig = split(token)[2]
        if "-" in sig or "_" in sig:
            return with_segment(token, 2, sig.replace("-", "+").replace("_", "/"))
    raise AssertionError("no signature with '-' or '_' in 100 tries")


def _padded(index: int) -> Callable[[Forge], str]:
    def build(f: Forge) -> str:
        token = f.valid()
        encoded = split(token)[index]
        return with_segment(token, index, encoded + "=" * (-len(encoded) % 4 or 4))

    return build


def _around_size_cap(f: Forge, limit: int = 4096) -> tuple[str, str]:
    """The longest valid token of at most ``limit`` characters and the shortest longer one."""
    base = len(f.sign(payload=f.claims(client_id="")))
    n = max(0, (limit - base) * 3 // 4 - 8)
    within = ""
    while True:
        token = f.sign(payload=f.claims(client_id="x" * n))
        if len(token) > limit:
            return within, token
        within, n = token, n + 1


def _json_serialization(flattened: bool) -> Callable[[Forge], str]:
    def build(f: Forge) -> str:
        header, payload, signature = split(f.valid())
        if flattened:
            return json.dumps({"payload": payload, "protected": header, "signature": signature})
        return json.dumps(
            {"payload": payload, "signatures": [{"protected": header, "signature": signature}]}
        )

    return build


def _jwe_to_public_key(f: Forge) -> str:
    """A compact JWE of valid claims, encrypted to the server's own public key."""
    public = {k: v for k, v in f.key.public_jwk.items() if k not in ("use", "alg")}
    token = jwe.JWE(
        json_bytes(f.claims()),
        protected={"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "typ": "at+jwt", "kid": f.key.kid},
    )
    token.add_recipient(jwk.JWK(**public))
    return token.serialize(compact=True)


def _zipped(client_id_length: int) -> Callable[[Forge], str]:
    """zip: DEF over the claims, deflated; ~2 MB of them still make a token under the cap."""

    def build(f: Forge) -> str:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw DEFLATE, RFC 7516 4.1.3
        claims = json_bytes(f.claims(client_id="0" * client_id_length))
        return f.sign(f.header(zip="DEF"), deflate.compress(claims) + deflate.flush())

    return build


def _jwe_pbes2(f: Forge) -> str:
    """A compact JWE asking for PBES2 key derivation with 2**31 - 1 PBKDF2 iterations:
    minutes of CPU for a verifier that would try to decrypt it."""
    header = {
        "alg": "PBES2-HS512+A256KW",
        "enc": "A256GCM",
        "p2s": b64url(secrets.token_bytes(16)),
        "p2c": 2**31 - 1,
        "typ": "at+jwt",
        "kid": f.key.kid,
    }
    rest = [b64url(secrets.token_bytes(n)) for n in (40, 12, 200, 16)]
    return ".".join([segment(header), *rest])


def _one_mb(f: Forge) -> dict[str, object]:
    """Valid claims padded to 1 MB (for tokens that must fail the size cap first)."""
    return f.claims(client_id="x" * (1 << 20))


def _raw_claim(name: str, literal: bytes) -> Callable[[Forge], str]:
    """Valid claims with ``name`` set to a JSON literal that Python's json cannot emit."""

    def build(f: Forge) -> str:
        payload = json_bytes(f.claims(**{name: "@@"})).replace(b'"@@"', literal)
        return f.sign(payload=payload)

    return build


def _payload_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Forge], str]:
    return lambda f: f.sign(payload=edit(json_bytes(f.claims())))


def _header_bytes(f: Forge, body: bytes) -> bytes:
    return b'{"alg":"ES256","typ":"at+jwt","kid":"' + f.key.kid.encode() + b'"' + body + b"}"


def _alg_none(alg: str) -> list[Case]:
    """``alg: none`` with the empty signature (already not a JWS: an empty segment is not
    base64url), and with a real signature, which only the alg rule can reject."""
    return [
        Case(
            f"alg-{alg}-empty-signature", lambda f: f.unsigned(f.header(alg=alg)), Reason.MALFORMED
        ),
        Case(f"alg-{alg}-signed", lambda f: f.sign(f.header(alg=alg)), Reason.BAD_ALGORITHM),
    ]


def _hmac(alg: str) -> list[Case]:
    return [
        Case(
            f"{alg}-public-key-pem", lambda f: f.hmac(alg, f.key.public_pem), Reason.BAD_ALGORITHM
        ),
        Case(
            f"{alg}-public-key-jwk-json",
            lambda f: f.hmac(alg, json_bytes(f.key.public_jwk)),
            Reason.BAD_ALGORITHM,
        ),
    ]


def _label(value: object) -> str:
    return value if isinstance(value, str) else type(value).__name__


def _wrong_alg(alg: object) -> Case:
    return Case(
        f"alg-{_label(alg)}-signed", lambda f: f.sign(f.header(alg=alg)), Reason.BAD_ALGORITHM
    )


def _header_member(name: str, value: Callable[[Forge], object]) -> Case:
    """A header member beyond alg/typ/kid, in a token otherwise valid."""
    return Case(f"header-{name}", lambda f: f.sign(f.header(**{name: value(f)})), Reason.BAD_HEADER)


def _typ(typ: object, reason: Reason | None) -> Case:
    return Case(f"typ-{_label(typ)}", lambda f: f.sign(f.header(typ=typ)), reason)


def _claim(name: str, label: str, value: Callable[[Forge], object], reason: Reason | None) -> Case:
    return Case(f"{name}-{label}", lambda f: f.sign(payload=f.claims(**{name: value(f)})), reason)


def _mangle(
    label: str,
    edit: Callable[[str], str],
    introspect: Seen | None = None,
    interceptor: Reason | Wire | None = Wire.LIKE_VERIFIER,
) -> Case:
    return Case(label, lambda f: edit(f.valid()), Reason.MALFORMED, introspect, interceptor)


def _one_mb_case(label: str, build: Callable[[Forge], str]) -> Case:
    return Case(label, build, Reason.TOO_LARGE, Seen.RESOURCE_EXHAUSTED)


def _unsendable(label: str, edit: Callable[[str], str]) -> Case:
    """A token with a character outside printable ASCII: Introspect refuses the request,
    gRPC will not carry it in a header, the decision finds it malformed."""
    return _mangle(label, edit, Seen.INVALID_ARGUMENT, Wire.UNSENDABLE)


CASES: list[Case] = [
    # The control: a forged token that breaks no rule is accepted by both paths.
    Case("baseline-valid", lambda f: f.valid(), ACCEPTED),
    # The signing input is the token's own bytes, whatever the member order or spacing.
    Case(
        "header-members-reordered",
        lambda f: f.sign({"kid": f.key.kid, "typ": "at+jwt", "alg": "ES256"}),
        ACCEPTED,
    ),
    Case(
        "header-json-with-whitespace",
        lambda f: f.sign(
            b' { "alg" : "ES256" ,\n "typ" : "at+jwt" , "kid" : "%s" } ' % f.key.kid.encode()
        ),
        ACCEPTED,
    ),
    # -- alg -----------------------------------------------------------------------------
    *_alg_none("none"),
    *_alg_none("None"),
    *_alg_none("nOnE"),
    *_alg_none("NONE"),
    *_hmac("HS256"),
    *_hmac("HS384"),
    *_hmac("HS512"),
    Case("HS256-public-key-der", lambda f: f.hmac("HS256", f.key.public_der), Reason.BAD_ALGORITHM),
    Case("alg-RS256-attacker-rsa-key", lambda f: f.rs256(), Reason.BAD_ALGORITHM),
    *[_wrong_alg(alg) for alg in ("es256", "ES256 ", "ES384", "ES512", "PS256", "EdDSA")],
    *[_wrong_alg(alg) for alg in (None, ["ES256"], 256)],
    Case("alg-missing", lambda f: f.sign(f.header(alg=DROP)), Reason.BAD_ALGORITHM),
    Case(
        "alg-PBES2-huge-p2c",
        lambda f: f.sign(f.header(alg="PBES2-HS512+A256KW", p2s=b64url(b"salt"), p2c=2**31 - 1)),
        Reason.BAD_ALGORITHM,
    ),
    # -- kid -----------------------------------------------------------------------------
    Case("kid-unknown", lambda f: f.sign(f.header(kid=EcKey.generate().kid)), Reason.UNKNOWN_KEY),
    Case(
        "kid-path-traversal",
        lambda f: f.sign(f.header(kid="../../../../etc/passwd")),
        Reason.UNKNOWN_KEY,
    ),
    Case(
        "kid-sql",
        lambda f: f.sign(f.header(kid="x' UNION SELECT key FROM keys --")),
        Reason.UNKNOWN_KEY,
    ),
    Case("kid-sql-tautology", lambda f: f.sign(f.header(kid="' OR '1'='1")), Reason.UNKNOWN_KEY),
    Case("kid-absolute-path", lambda f: f.sign(f.header(kid="/dev/null")), Reason.UNKNOWN_KEY),
    Case(
        "kid-url",
        lambda f: f.sign(f.header(kid="https://attacker.example/key.pem")),
        Reason.UNKNOWN_KEY,
    ),
    Case("kid-2000-chars", lambda f: f.sign(f.header(kid="k" * 2000)), Reason.UNKNOWN_KEY),
    Case(
        "kid-real-plus-nul", lambda f: f.sign(f.header(kid=f.key.kid + "\x00")), Reason.UNKNOWN_KEY
    ),
    Case(
        "kid-real-uppercased", lambda f: f.sign(f.header(kid=f.key.kid.upper())), Reason.UNKNOWN_KEY
    ),
    Case("kid-missing", lambda f: f.sign(f.header(kid=DROP)), Reason.BAD_HEADER),
    Case("kid-empty", lambda f: f.sign(f.header(kid="")), Reason.BAD_HEADER),
    Case("kid-number", lambda f: f.sign(f.header(kid=1)), Reason.BAD_HEADER),
    Case("kid-list", lambda f: f.sign(f.header(kid=[f.key.kid])), Reason.BAD_HEADER),
    Case(
        "kid-attacker-signed-by-attacker",
        lambda f: f.sign(f.header(kid=f.attacker.kid), key=f.attacker),
        Reason.UNKNOWN_KEY,
    ),
    Case("kid-real-signed-by-attacker", lambda f: f.sign(key=f.attacker), Reason.BAD_SIGNATURE),
    # -- keys and key URLs in the header, crit, zip ---------------------------------------
    Case(
        "header-jwk-attacker-key-signed-by-it",
        lambda f: f.sign(f.header(kid=f.attacker.kid, jwk=f.attacker.public_jwk), key=f.attacker),
        Reason.BAD_HEADER,
    ),
    Case(
        "header-jwk-attacker-key-real-kid",
        lambda f: f.sign(f.header(jwk=f.attacker.public_jwk), key=f.attacker),
        Reason.BAD_HEADER,
    ),
    # Key sources named by the token, for the attacker's own kid and key: an unknown kid
    # would be UNKNOWN_KEY, so BAD_HEADER shows the member is refused before the key lookup.
    *[
        Case(
            f"header-{name}-attacker-kid",
            lambda f, name=name, value=value: f.sign(
                f.header(kid=f.attacker.kid, **{name: value(f)}), key=f.attacker
            ),
            Reason.BAD_HEADER,
        )
        for name, value in [
            ("jku", lambda f: "https://attacker.example/jwks.json"),
            ("x5u", lambda f: "https://attacker.example/cert.pem"),
            ("x5c", lambda f: [b64url(f.attacker.self_signed_cert_der())]),
        ]
    ],
    _header_member("jwk", lambda f: f.key.public_jwk),
    _header_member("jku", lambda f: "https://attacker.example/jwks.json"),
    _header_member("x5u", lambda f: "https://attacker.example/cert.pem"),
    _header_member("x5c", lambda f: [b64url(f.attacker.self_signed_cert_der())]),
    _header_member("x5t#S256", lambda f: b64url(b"\x00" * 32)),
    _header_member("crit", lambda f: ["exp"]),
    _header_member("epk", lambda f: f.attacker.public_jwk),
    _header_member("p2c", lambda f: 2**31 - 1),
    Case(
        "header-crit-unknown-extension",
        lambda f: f.sign(f.header(crit=["urn:attacker:ext"], **{"urn:attacker:ext": True})),
        Reason.BAD_HEADER,
    ),
    Case("header-crit-empty", lambda f: f.sign(f.header(crit=[])), Reason.BAD_HEADER),
    _header_member("cty", lambda f: "JWT"),
    _header_member("enc", lambda f: "A256GCM"),
    _header_member("b64", lambda f: False),
    _header_member("nonstandard", lambda f: 1),
    Case(
        "header-crit-b64-false",
        lambda f: f.sign(f.header(crit=["b64"], b64=False), json_bytes(f.claims())),
        Reason.BAD_HEADER,
    ),
    Case("header-zip-deflate-bomb", _zipped(2_000_000), Reason.BAD_HEADER),
    Case("header-zip-deflate", _zipped(0), Reason.BAD_HEADER),
    # -- typ -----------------------------------------------------------------------------
    _typ("JWT", Reason.BAD_TYPE),
    _typ("jwt", Reason.BAD_TYPE),
    _typ("application/jwt", Reason.BAD_TYPE),
    _typ("at+jwt ", Reason.BAD_TYPE),
    _typ("JOSE", Reason.BAD_TYPE),
    _typ(1, Reason.BAD_TYPE),
    _typ(None, Reason.BAD_TYPE),
    Case("typ-missing", lambda f: f.sign(f.header(typ=DROP)), Reason.BAD_TYPE),
    # Media types are case-insensitive and may omit "application/" (RFC 7515 4.1.9).
    _typ("at+JWT", ACCEPTED),
    _typ("AT+JWT", ACCEPTED),
    _typ("application/at+jwt", ACCEPTED),
    # -- refresh token as access token ---------------------------------------------------
    Case(
        "refresh-token-as-access", lambda f: f.refresh_token, Reason.REFRESH_AS_ACCESS, Seen.REFRESH
    ),
    Case("refresh-prefix-on-valid-jws", lambda f: "tsr1_" + f.valid(), Reason.REFRESH_AS_ACCESS),
    # -- signature -----------------------------------------------------------------------
    Case("tampered-payload", _tampered_payload, Reason.BAD_SIGNATURE),
    Case("tampered-header", _tampered_header, Reason.BAD_SIGNATURE),
    Case("signature-bit-flip", _bit_flip, Reason.BAD_SIGNATURE),
    Case("signature-of-another-token", _spliced_signature, Reason.BAD_SIGNATURE),
    Case("signature-r0-s0", _with_rs(0, 0), Reason.BAD_SIGNATURE),
    Case("signature-r0", _with_rs(r=0), Reason.BAD_SIGNATURE),
    Case("signature-s0", _with_rs(s=0), Reason.BAD_SIGNATURE),
    Case("signature-r-equals-n", _with_rs(r=P256_ORDER), Reason.BAD_SIGNATURE),
    Case("signature-s-equals-n", _with_rs(s=P256_ORDER), Reason.BAD_SIGNATURE),
    Case("signature-r-max", _with_rs(r=2**256 - 1), Reason.BAD_SIGNATURE),
    Case("signature-s-max", _with_rs(s=2**256 - 1), Reason.BAD_SIGNATURE),
    # ECDSA is malleable: (r, n - s) verifies too. One spelling per token needs the
    # signer to emit low-S only and the verifier to refuse high-S (forge signs low-S).
    Case("signature-high-s-twin", _high_s_twin, Reason.BAD_SIGNATURE),
    Case("signature-der", _resized_signature(der_of), Reason.BAD_SIGNATURE),
    Case("signature-63-bytes", _resized_signature(lambda s: s[:63]), Reason.BAD_SIGNATURE),
    Case("signature-65-bytes", _resized_signature(lambda s: s + b"\x00"), Reason.BAD_SIGNATURE),
    Case("signature-32-bytes", _resized_signature(lambda s: s[:32]), Reason.BAD_SIGNATURE),
    Case(
        "signature-66-bytes-zero-padded", _resized_signature(_zero_padded(33)), Reason.BAD_SIGNATURE
    ),
    Case(
        "signature-96-bytes-zero-padded", _resized_signature(_zero_padded(48)), Reason.BAD_SIGNATURE
    ),
    Case(
        "signature-128-bytes-zero-padded",
        _resized_signature(_zero_padded(64)),
        Reason.BAD_SIGNATURE,
    ),
    Case("signature-empty", lambda f: f.unsigned(), Reason.MALFORMED),
    # -- serialization -------------------------------------------------------------------
    Case("jws-json-general", _json_serialization(flattened=False), Reason.MALFORMED),
    Case("jws-json-flattened", _json_serialization(flattened=True), Reason.MALFORMED),
    Case("jwe-compact-to-public-key", _jwe_to_public_key, Reason.MALFORMED),
    Case("jwe-compact-pbes2-huge-p2c", _jwe_pbes2, Reason.MALFORMED),
    _mangle("extra-segment", lambda t: t + "." + split(t)[2]),
    _mangle("trailing-dot", lambda t: t + "."),
    _mangle("two-segments", lambda t: t.rsplit(".", 1)[0]),
    _mangle("empty-payload-segment", lambda t: with_segment(t, 1, "")),
    _mangle("dots-only", lambda t: ".."),
    _mangle("empty-token", lambda t: "", Seen.INVALID_ARGUMENT),
    _mangle("bearer-prefix", lambda t: "Bearer " + t),
    # "Bearer  <token>": one more space of the separator, the token itself is intact.
    _mangle("leading-space", lambda t: " " + t, interceptor=ACCEPTED),
    _mangle("trailing-space", lambda t: t + " "),
    _mangle("space-after-dot", lambda t: t.replace(".", ". ", 1)),
    _mangle(
        "space-inside-payload",
        lambda t: with_segment(t, 1, split(t)[1][:20] + " " + split(t)[1][20:]),
    ),
    _mangle("1000-segments", lambda t: ".".join(["e30"] * 1000)),
    _unsendable("trailing-newline", lambda t: t + "\n"),
    _unsendable("leading-crlf", lambda t: "\r\n" + t),
    _unsendable("tab-inside", lambda t: t.replace(".", ".\t", 1)),
    _unsendable("nbsp-inside", lambda t: t.replace(".", ".\u00a0", 1)),
    _unsendable("zero-width-space-inside", lambda t: t[:10] + "\u200b" + t[10:]),
    _unsendable("fullwidth-lookalike", lambda t: "\uff45" + t[1:]),
    Case("padding-header", _padded(0), Reason.MALFORMED),
    Case("padding-payload", _padded(1), Reason.MALFORMED),
    Case("padding-signature", _padded(2), Reason.MALFORMED),
    Case("noncanonical-base64-header", _noncanonical(0), Reason.MALFORMED),
    Case("noncanonical-base64-payload", _noncanonical(1), Reason.MALFORMED),
    Case("noncanonical-base64-signature", _noncanonical(2), Reason.MALFORMED),
    Case("standard-base64-alphabet", _standard_alphabet, Reason.MALFORMED),
    # -- size and nesting (rejected before any decoding or by the JSON depth limit) -------
    Case("size-cap-longest-allowed", lambda f: _around_size_cap(f)[0], ACCEPTED),
    Case("size-cap-one-over", lambda f: _around_size_cap(f)[1], Reason.TOO_LARGE),
    # 1 MB: Introspect's request is over the service's gRPC message cap (64 KiB), so gRPC
    # refuses it before Introspect runs. The interceptor servers raise the header limit
    # instead, so that it is the interceptor's own size cap that must refuse these first.
    _one_mb_case("size-1mb-signed", lambda f: f.sign(payload=_one_mb(f))),
    _one_mb_case("size-1mb-dots", lambda f: "." * (1 << 20)),
    _one_mb_case(
        "size-1mb-deep-nesting", lambda f: f.sign(payload=b"[" * (1 << 19) + b"]" * (1 << 19))
    ),
    _one_mb_case("size-1mb-zip-header", lambda f: f.sign(f.header(zip="DEF"), _one_mb(f))),
    _one_mb_case(
        "size-1mb-unknown-kid",
        lambda f: f.sign(f.header(kid=f.attacker.kid), _one_mb(f), key=f.attacker),
    ),
    _one_mb_case("size-1mb-alg-none", lambda f: f.unsigned(f.header(alg="none"), _one_mb(f))),
    _one_mb_case("size-1mb-refresh-prefix", lambda f: "tsr1_" + "A" * (1 << 20)),
    Case(
        "deep-nesting-payload",
        lambda f: f.sign(payload=b"[" * 1400 + b"]" * 1400),
        Reason.MALFORMED,
    ),
    Case(
        "deep-nesting-header", lambda f: f.sign(header=b"[" * 1100 + b"]" * 1100), Reason.MALFORMED
    ),
    # Deeper than the JSON decoder's recursion limit, inside an otherwise valid object.
    Case(
        "deep-nesting-in-claim",
        _payload_bytes(lambda p: p[:-1] + b',"ext":' + b"[" * 1200 + b"]" * 1200 + b"}"),
        Reason.MALFORMED,
    ),
    # -- JSON ----------------------------------------------------------------------------
    Case(
        "header-duplicate-alg",
        lambda f: f.sign(b'{"alg":"none",' + _header_bytes(f, b"")[1:]),
        Reason.MALFORMED,
    ),
    Case(
        "header-duplicate-alg-same-value",
        lambda f: f.sign(b'{"alg":"ES256",' + _header_bytes(f, b"")[1:]),
        Reason.MALFORMED,
    ),
    Case(
        "header-duplicate-kid-escaped-name",
        lambda f: f.sign(_header_bytes(f, b',"k\\u0069d":"' + f.attacker.kid.encode() + b'"')),
        Reason.MALFORMED,
    ),
    Case(
        "header-duplicate-kid",
        lambda f: f.sign(_header_bytes(f, b',"kid":"' + f.key.kid.encode() + b'"')),
        Reason.MALFORMED,
    ),
    Case("header-array", lambda f: f.sign(["ES256", "at+jwt", f.key.kid]), Reason.MALFORMED),
    Case("header-string", lambda f: f.sign("ES256"), Reason.MALFORMED),
    Case(
        "header-invalid-utf8", lambda f: f.sign(_header_bytes(f, b',"x":"\xff"')), Reason.MALFORMED
    ),
    Case(
        "header-utf8-bom",
        lambda f: f.sign(b"\xef\xbb\xbf" + _header_bytes(f, b"")),
        Reason.MALFORMED,
    ),
    Case(
        "header-trailing-garbage", lambda f: f.sign(_header_bytes(f, b"") + b"x"), Reason.MALFORMED
    ),
    Case(
        "payload-duplicate-sub",
        _payload_bytes(lambda p: p[:-1] + b',"sub":"admin"}'),
        Reason.MALFORMED,
    ),
    Case(
        "payload-duplicate-exp",
        _payload_bytes(lambda p: p[:-1] + b',"exp":9999999999}'),
        Reason.MALFORMED,
    ),
    Case(
        "payload-duplicate-aud",
        _payload_bytes(lambda p: p[:-1] + b',"aud":["billing"]}'),
        Reason.MALFORMED,
    ),
    Case(
        "payload-duplicate-iss",
        _payload_bytes(lambda p: p[:-1] + b',"iss":"https://attacker.example"}'),
        Reason.MALFORMED,
    ),
    Case("payload-array", lambda f: f.sign(payload=[f.claims()]), Reason.MALFORMED),
    Case("payload-string", lambda f: f.sign(payload="alice"), Reason.MALFORMED),
    Case("payload-number", lambda f: f.sign(payload=1), Reason.MALFORMED),
    Case("payload-null", lambda f: f.sign(payload=b"null"), Reason.MALFORMED),
    Case("payload-empty-object", lambda f: f.sign(payload={}), Reason.BAD_CLAIMS),
    Case(
        "payload-invalid-utf8",
        _payload_bytes(lambda p: p.replace(b'"alice"', b'"al\xffce"')),
        Reason.MALFORMED,
    ),
    Case(
        "payload-overlong-utf8",
        _payload_bytes(lambda p: p.replace(b'"alice"', b'"alice\xc0\xae"')),
        Reason.MALFORMED,
    ),
    Case(
        "payload-utf8-encoded-surrogate",
        _payload_bytes(lambda p: p.replace(b'"alice"', b'"\xed\xa0\x80"')),
        Reason.MALFORMED,
    ),
    # A lone surrogate escape is JSON but not Unicode text (I-JSON, RFC 7493 2.1, forbids
    # it): it cannot be encoded into a protobuf string or a Redis key.
    Case(
        "sub-lone-surrogate-escape",
        _payload_bytes(lambda p: p.replace(b'"alice"', b'"\\ud800"')),
        Reason.MALFORMED,
    ),
    Case(
        "sid-lone-surrogate-escape",
        _payload_bytes(lambda p: p.replace(b'"sid":"', b'"sid":"\\udfff')),
        Reason.MALFORMED,
    ),
    # -- exp -----------------------------------------------------------------------------
    _claim("exp", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("exp", "past", lambda f: f.now - 1, Reason.EXPIRED),
    _claim("exp", "equals-now", lambda f: f.now, Reason.EXPIRED),
    # The leeway is for nbf and iat only.
    _claim("exp", "past-within-leeway", lambda f: f.now - f.leeway // 2, Reason.EXPIRED),
    _claim("exp", "null", lambda f: None, Reason.BAD_CLAIMS),
    _claim("exp", "string", lambda f: str(f.now + 600), Reason.BAD_CLAIMS),
    _claim("exp", "float", lambda f: f.now + 600.5, Reason.BAD_CLAIMS),
    _claim("exp", "integral-float", lambda f: float(f.now + 600), Reason.BAD_CLAIMS),
    _claim("exp", "bool", lambda f: True, Reason.BAD_CLAIMS),
    _claim("exp", "1e300", lambda f: 1e300, Reason.BAD_CLAIMS),
    _claim("exp", "2**64", lambda f: 2**64, Reason.BAD_CLAIMS),
    _claim("exp", "2**53", lambda f: 2**53, Reason.BAD_CLAIMS),
    _claim("exp", "negative", lambda f: -1, Reason.BAD_CLAIMS),
    # 10000-01-01T00:00:00Z: beyond what a protobuf Timestamp (or datetime) can hold.
    _claim("exp", "after-year-9999", lambda f: 253_402_300_800, Reason.BAD_CLAIMS),
    Case("exp-NaN", _raw_claim("exp", b"NaN"), Reason.MALFORMED),
    Case("exp-Infinity", _raw_claim("exp", b"Infinity"), Reason.MALFORMED),
    Case("exp-exponent-literal", _raw_claim("exp", b"1e10"), Reason.BAD_CLAIMS),
    # Python's json reads 1e400 as float("inf"), and 401 digits as a big int.
    Case("exp-1e400-literal", _raw_claim("exp", b"1e400"), Reason.BAD_CLAIMS),
    Case("exp-401-digits-literal", _raw_claim("exp", b"1" + b"0" * 400), Reason.BAD_CLAIMS),
    # -- nbf / iat -----------------------------------------------------------------------
    _claim("nbf", "beyond-leeway", lambda f: f.now + f.leeway + 120, Reason.NOT_YET_VALID),
    _claim("iat", "beyond-leeway", lambda f: f.now + f.leeway + 120, Reason.NOT_YET_VALID),
    _claim("nbf", "within-leeway", lambda f: f.now + f.leeway - 10, ACCEPTED),
    _claim("iat", "within-leeway", lambda f: f.now + f.leeway - 10, ACCEPTED),
    _claim("nbf", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("iat", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("nbf", "string", lambda f: str(f.now), Reason.BAD_CLAIMS),
    # -- iss -----------------------------------------------------------------------------
    _claim("iss", "other", lambda f: "https://attacker.example", Reason.WRONG_ISSUER),
    _claim("iss", "trailing-slash", lambda f: f.issuer + "/", Reason.WRONG_ISSUER),
    _claim("iss", "uppercased", lambda f: f.issuer.upper(), Reason.WRONG_ISSUER),
    _claim("iss", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("iss", "list", lambda f: [f.issuer], Reason.BAD_CLAIMS),
    _claim("iss", "number", lambda f: 1, Reason.BAD_CLAIMS),
    # -- aud -----------------------------------------------------------------------------
    _claim("aud", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("aud", "other", lambda f: ["billing"], Reason.WRONG_AUDIENCE),
    _claim("aud", "uppercased", lambda f: ["MESH"], Reason.WRONG_AUDIENCE),
    _claim("aud", "empty-string", lambda f: "", Reason.WRONG_AUDIENCE),
    _claim("aud", "empty-list", lambda f: [], Reason.BAD_CLAIMS),
    _claim("aud", "number", lambda f: 1, Reason.BAD_CLAIMS),
    _claim("aud", "object", lambda f: {"mesh": True}, Reason.BAD_CLAIMS),
    _claim("aud", "null", lambda f: None, Reason.BAD_CLAIMS),
    _claim("aud", "bool", lambda f: True, Reason.BAD_CLAIMS),
    _claim("aud", "nested-list", lambda f: [["mesh"]], Reason.BAD_CLAIMS),
    _claim("aud", "list-with-number", lambda f: ["mesh", 1], Reason.BAD_CLAIMS),
    # A single string is a valid "aud" (RFC 7519 4.1.3).
    _claim("aud", "string", lambda f: "mesh", ACCEPTED),
    # -- sub and the other claims --------------------------------------------------------
    _claim("sub", "empty", lambda f: "", Reason.BAD_CLAIMS),
    _claim("sub", "number", lambda f: 42, Reason.BAD_CLAIMS),
    _claim("sub", "null", lambda f: None, Reason.BAD_CLAIMS),
    _claim("sub", "list", lambda f: ["alice"], Reason.BAD_CLAIMS),
    _claim("sub", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("jti", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("sid", "missing", lambda f: DROP, Reason.BAD_CLAIMS),
    _claim("sid", "empty", lambda f: "", Reason.BAD_CLAIMS),
    _claim("roles", "string", lambda f: "admin", Reason.BAD_CLAIMS),
    _claim("client_id", "number", lambda f: 7, Reason.BAD_CLAIMS),
    _claim("cnf", "string", lambda f: "thumbprint", Reason.BAD_CLAIMS),
    _claim("auth_time", "string", lambda f: str(f.now), Reason.BAD_CLAIMS),
]

IDS = [case.name for case in CASES]


def test_case_names_are_unique() -> None:
    assert len(set(IDS)) == len(IDS)


def test_forged_tokens_are_signed_with_the_servers_real_key(
    forge: Forge, service_stub: Stub, jwks: str
) -> None:
    """Without this, every "one rule broken" case could be a forged-signature case."""
    issued = service_stub.Issue(pb.IssueRequest(subject="alice")).tokens.access_token
    assert split(issued)[0] == split(forge.valid())[0]
    published = json.loads(jwks)["keys"]
    assert [key["kid"] for key in published] == [forge.key.kid]
    assert {k: published[0][k] for k in ("x", "y")} == {
        k: forge.key.public_jwk[k] for k in ("x", "y")
    }


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_verifier(case: Case, forge: Forge, verifier: Verifier, keyset: KeySet) -> None:
    token = case.build(forge)
    if case.reason is ACCEPTED:
        claims = verifier.verify(token, keyset)
        assert claims.session_id == forge.session_id
        return
    with pytest.raises(InvalidToken) as caught:
        verifier.verify(token, keyset)
    assert caught.value.reason is case.reason, caught.value


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_introspect(case: Case, forge: Forge, service_stub: Stub) -> None:
    assert introspect(service_stub, case.build(forge)) is case.introspect_answer


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decision(case: Case, forge: Forge, authenticator: Authenticator, keyset: KeySet) -> None:
    """The interceptors' shared decision on ``Bearer <token>``, in process. Only an unknown
    ``kid`` may ask for a newer key set (a refetch); nothing else may cause one."""
    outcome, requests = decide(authenticator, bearer(case.build(forge)), keyset)
    expected = case.decision_answer
    if expected is ACCEPTED:
        assert isinstance(outcome, Claims), outcome
        assert outcome.session_id == forge.session_id
    else:
        assert outcome == Rejection.invalid_token(expected)
    asked_newer = any(request.lacking is not None for request in requests)
    assert asked_newer == (expected is Reason.UNKNOWN_KEY), requests


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_interceptor(case: Case, forge: Forge, protected: Protected) -> None:
    """Over loopback, through AuthInterceptor or AioAuthInterceptor: refused before the
    handler runs, with only the reason code; and no key fetch for any case."""
    token = case.build(forge)
    runs, fetches = len(protected.runs), len(protected.fetches)
    answer = protected.call(token)
    expected = case.wire_answer
    if expected is ACCEPTED:
        assert answer.code is grpc.StatusCode.OK, answer
        assert answer.seen is not None and answer.seen["sid"] == forge.session_id
        assert len(protected.runs) == runs + 1
    else:
        if expected is Wire.UNSENDABLE:
            assert not (token.isascii() and token.isprintable())
            assert answer.code is grpc.StatusCode.INTERNAL, answer  # raised by the client
        else:
            assert answer == Answer(
                grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {expected.value}"
            )
        assert len(protected.runs) == runs
    assert len(protected.fetches) == fetches


@pytest.mark.parametrize("member", ["jku", "x5u"])
def test_key_urls_in_the_header_are_never_fetched(
    member: str,
    forge: Forge,
    verifier: Verifier,
    keyset: KeySet,
    service_stub: Stub,
    protected: Protected,
) -> None:
    """A listening socket that nobody may connect to while every path rejects the token."""
    with socket.create_server(("127.0.0.1", 0)) as trap:
        trap.setblocking(False)
        url = f"http://127.0.0.1:{trap.getsockname()[1]}/keys"
        header = forge.header(kid=forge.attacker.kid, **{member: url})
        token = forge.sign(header, key=forge.attacker)
        with pytest.raises(InvalidToken) as caught:
            verifier.verify(token, keyset)
        assert caught.value.reason is Reason.BAD_HEADER
        assert introspect(service_stub, token) is Seen.INACTIVE
        assert protected.call(token) == Answer(
            grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {Reason.BAD_HEADER.value}"
        )
        with pytest.raises(BlockingIOError):
            trap.accept()


def test_introspect_survives_a_burst_of_unknown_kids(forge: Forge, service_stub: Stub) -> None:
    """Unknown kids trigger at most a rate-limited key ring reload, never an error."""
    for _ in range(20):
        token = forge.sign(forge.header(kid=EcKey.generate().kid))
        assert introspect(service_stub, token) is Seen.INACTIVE
