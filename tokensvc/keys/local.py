"""The ``local`` key backend: key pairs generated in this process, stored in Redis as a
compact JWE (A256KW + A256GCM) under the operator's key-encryption key (KEK), decrypted
into memory to sign.

The JWE's ``kid`` is the KEK's thumbprint, so a previous KEK can still decrypt during a KEK
rotation and ``rewrap`` knows which records to re-encrypt. This is the default backend and
the format every record had before backends existed (no ``backend`` field).

What it protects against: a copy of Redis (a backup, a replica, a snapshot) yields no
signing key without the KEK. What it does not: a process that can sign holds the private
key in memory, so a memory dump or a compromised replica yields it (see
:mod:`tokensvc.keys.pkcs11` for keys that never enter the process).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe, jwk

from tokensvc.families import tokens
from tokensvc.keys.backend import LOCAL, KeyRingError
from tokensvc_client.verifier import ALGORITHM, TOKEN_TYPE, b64url_decode


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A local private key, decrypted: signs in the calling thread (no I/O), through
    ``cryptography`` directly (``private``, taken from the JWK once)."""

    kid: str
    key: jwk.JWK
    private: ec.EllipticCurvePrivateKey = field(init=False)

    def __post_init__(self) -> None:
        private = self.key.get_op_key("sign")
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise KeyRingError(f"signing key {self.kid} is not an EC private key")
        object.__setattr__(self, "private", private)

    async def sign_token(self, claims: dict[str, Any], typ: str = TOKEN_TYPE) -> str:
        return tokens.sign_access_token(self.private, self.kid, claims, typ)


class LocalBackend:
    """Key pairs under the KEK (see the module doc).

    Args:
        kek: the key-encryption key new and re-wrapped records are encrypted under.
        previous_keks: older KEKs still accepted for decryption (KEK rotation).
    """

    name = LOCAL

    def __init__(self, kek: jwk.JWK, previous_keks: Iterable[jwk.JWK] = ()) -> None:
        self.kek = kek
        self.kek_id = kek.thumbprint()
        self.keks = {k.thumbprint(): k for k in (*previous_keks, kek)}

    async def generate(self) -> dict[str, Any]:
        key = jwk.JWK.generate(kty="EC", crv="P-256")
        return {"kid": key.thumbprint(), "public": public_jwk(key), "private": self.wrap(key)}

    def open(self, record: dict[str, Any]) -> SigningKey:
        return SigningKey(str(record["kid"]), self.decrypt(record))

    async def destroy(self, record: dict[str, Any]) -> None:
        """Nothing to do: the JWE left Redis with its record."""

    async def check(self, record: dict[str, Any] | None) -> None:
        """Nothing to do: a local key that decrypted signs."""

    def problem(self) -> str | None:
        return None

    # -- the JWE under the KEK -----------------------------------------------------------

    def wrap(self, key: jwk.JWK) -> str:
        token = jwe.JWE(
            key.export_private().encode("utf-8"),
            protected={"alg": "A256KW", "enc": "A256GCM", "kid": self.kek_id, "cty": "jwk+json"},
        )
        token.add_recipient(self.kek)
        return str(token.serialize(compact=True))

    def decrypt(self, record: dict[str, Any]) -> jwk.JWK:
        kek = self.keks.get(jwe_kid(record.get("private", "")), self.kek)
        try:
            token = jwe.JWE()
            token.deserialize(record["private"], key=kek)
            key = jwk.JWK.from_json(token.payload.decode("utf-8"))
        except Exception:
            raise undecryptable(f"signing key {record.get('kid')}") from None
        return key


def public_jwk(key: jwk.JWK) -> dict[str, Any]:
    """The JWK Set entry of an EC key: public members, ``kid`` (its RFC 7638 thumbprint),
    ``use`` and ``alg``."""
    public: dict[str, Any] = json.loads(key.export_public())
    public.update({"kid": key.thumbprint(), "use": "sig", "alg": ALGORITHM})
    return public


def undecryptable(what: str) -> KeyRingError:
    """The start-up error for state in Redis that no KEK of this process decrypts: the
    operator's fix is a flag, so name the flags."""
    return KeyRingError(
        f"cannot decrypt {what} stored in Redis: wrong key-encryption key? It was encrypted "
        "under another KEK: check --kek-file (without it, the development KEK of --data-dir "
        "is used), or, during a KEK rotation, pass the old KEK with --previous-kek-file"
    )


def jwe_kid(compact: str) -> str:
    """The ``kid`` of a compact JWE's protected header ('' if unreadable)."""
    try:
        header = json.loads(b64url_decode(compact.split(".", 1)[0]))
        return str(header.get("kid", ""))
    except (ValueError, AttributeError):
        return ""
