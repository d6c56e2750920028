"""Hand-built tokens for the attack suite.

Segments are encoded here and signatures computed here with ``cryptography`` -- never
through the code under test -- so a case can break exactly one rule of
(docs/design.md, Verification rules) while staying valid in every other respect, including
a signature by the server's *real* signing key. (A forged token that is also badly signed
would only test the signature check.)
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID
from jwcrypto import jwk

#: Order of the P-256 group; valid ECDSA r and s lie in [1, n-1].
P256_ORDER: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
#: Access token lifetime the service mints by default (docs/design.md, Tokens).
ACCESS_TTL: Final = 900


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: Pass as a member value to remove that member from a header or claims object.
DROP: Final = _Drop()


# -- encoding ----------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    """Unpadded base64url, the one canonical spelling."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON, as the service emits it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def segment(part: Any) -> str:
    """Encode one header or payload part: ``bytes`` as they are, anything else as JSON."""
    return b64url(part if isinstance(part, bytes) else json_bytes(part))


def signing_input(header: Any, payload: Any) -> bytes:
    return f"{segment(header)}.{segment(payload)}".encode("ascii")


def split(token: str) -> list[str]:
    return token.split(".")


def with_segment(token: str, index: int, value: str) -> str:
    parts = split(token)
    parts[index] = value
    return ".".join(parts)


def with_signature(token: str, signature: bytes) -> str:
    return with_segment(token, 2, b64url(signature))


def signature_of(token: str) -> bytes:
    encoded = split(token)[2]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def noncanonical(encoded: str) -> str:
    """Same bytes, different spelling: set an unused trailing bit of the last character.

    Raises:
        ValueError: the segment's length is a multiple of 4 (no unused bits).
    """
    spare_bits = {2: 4, 3: 2}.get(len(encoded) % 4)
    if spare_bits is None:
        raise ValueError("segment has no unused trailing bits")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(encoded[-1]) | 1
    return encoded[:-1] + alphabet[last]


# -- ECDSA signatures --------------------------------------------------------------------


def raw_rs(r: int, s: int, size: int = 32) -> bytes:
    """The JWS form of an ECDSA signature: big-endian R || S, ``size`` bytes each."""
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def rs_of(signature: bytes) -> tuple[int, int]:
    half = len(signature) // 2
    return int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")


def der_of(signature: bytes) -> bytes:
    """The ASN.1 DER form (what OpenSSL produces) of a raw R || S signature."""
    return encode_dss_signature(*rs_of(signature))


def hmac_signature(alg: str, secret: bytes, data: bytes) -> bytes:
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    return hmac.new(secret, data, digest).digest()


def rs256_signature(private: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return private.sign(data, padding.PKCS1v15(), hashes.SHA256())


@dataclass(frozen=True)
class EcKey:
    """An ES256 key pair with its ``kid``: the server's real key or an attacker's."""

    kid: str
    private: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> EcKey:
        private = ec.generate_private_key(ec.SECP256R1())
        key = jwk.JWK.from_pyca(private)
        return cls(kid or key.thumbprint(), private)

    @classmethod
    def from_jwk(cls, key: jwk.JWK, kid: str) -> EcKey:
        private = key.get_op_key("sign")
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        return cls(kid, private)

    @property
    def public_jwk(self) -> dict[str, Any]:
        """RFC 7517 public JWK with ``kid``, ``use`` and ``alg``, as GetKeys publishes it."""
        members = json.loads(jwk.JWK.from_pyca(self.private.public_key()).export_public())
        return {**members, "kid": self.kid, "use": "sig", "alg": "ES256"}

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def public_der(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def es256(self, data: bytes) -> bytes:
        """A raw 64-byte R || S ES256 signature of ``data``, in low-S form.

        (r, s) and (r, n - s) both verify; a signer that emits only s <= n/2 lets a
        verifier insist on one spelling per token, so forged tokens use that form.
        """
        der = self.private.sign(data, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return raw_rs(r, min(s, P256_ORDER - s))

    def sign(self, header: Any, payload: Any) -> str:
        """A compact JWS of arbitrary header and payload parts, ES256-signed by this key."""
        data = signing_input(header, payload)
        return f"{data.decode('ascii')}.{b64url(self.es256(data))}"

    def self_signed_cert_der(self) -> bytes:
        """A self-signed X.509 certificate of this key (for ``x5c`` attacks)."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokensvc")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(self.private, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)


# -- claims and headers ------------------------------------------------------------------


def apply_changes(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` applied; a value of DROP removes the member."""
    out = dict(base)
    for name, value in changes.items():
        if value is DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def valid_claims(
    *, issuer: str, audience: str, session_id: str, now: int, **changes: Any
) -> dict[str, Any]:
    """Claims exactly as the service mints them (tokensvc.api.servicer), then ``changes``."""
    base = {
        "iss": issuer,
        "sub": "alice",
        "aud": [audience],
        "client_id": "web",
        "roles": ["reader"],
        "exp": now + ACCESS_TTL,
        "iat": now,
        "nbf": now,
        "jti": secrets.token_urlsafe(16),
        "sid": session_id,
    }
    return apply_changes(base, changes)


@dataclass(frozen=True)
class Forge:
    """Everything a case needs to craft a token against one running service.

    ``key`` is the service's real signing key; ``session_id`` a live session from Issue, so
    a token that passes every rule is also active for Introspect's revocation check.
    """

    key: EcKey
    issuer: str
    audience: str
    session_id: str
    refresh_token: str
    now: int
    leeway: int
    attacker: EcKey = field(default_factory=EcKey.generate)

    def header(self, **changes: Any) -> dict[str, Any]:
        return apply_changes({"alg": "ES256", "typ": "at+jwt", "kid": self.key.kid}, changes)

    def claims(self, **changes: Any) -> dict[str, Any]:
        return valid_claims(
            issuer=self.issuer,
            audience=self.audience,
            session_id=self.session_id,
            now=self.now,
            **changes,
        )

    def sign(self, header: Any = None, payload: Any = None, *, key: EcKey | None = None) -> str:
        """ES256-sign ``header`` and ``payload`` (defaults: valid ones) with the real key."""
        return (key or self.key).sign(
            self.header() if header is None else header,
            self.claims() if payload is None else payload,
        )

    def valid(self) -> str:
        return self.sign()

    def unsigned(self, header: Any = None, payload: Any = None, signature: bytes = b"") -> str:
        """A token with the given signature bytes (empty by default), signed by nobody."""
        data = signing_input(
            self.header() if header is None else header,
            self.claims() if payload is None else payload,
        )
        return f"{data.decode('ascii')}.{b64url(signature)}"

    def hmac(self, alg: str, secret: bytes) -> str:
        """``alg`` HS256/384/512 keyed with ``secret`` (e.g. the public key's bytes)."""
        header = self.header(alg=alg)
        payload = self.claims()
        return self.unsigned(
            header, payload, hmac_signature(alg, secret, signing_input(header, payload))
        )

    def rs256(self) -> str:
        """``alg`` RS256, signed by a fresh attacker RSA key."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        header = self.header(alg="RS256")
        payload = self.claims()
        return self.unsigned(
            header, payload, rs256_signature(private, signing_input(header, payload))
        )
