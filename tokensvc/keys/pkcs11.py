"""The ``pkcs11`` key backend: signing keys generated inside a PKCS#11 token, never out.

Rotation generates the EC P-256 key pair in the token (``CKA_TOKEN``, ``CKA_SENSITIVE``
true, ``CKA_EXTRACTABLE`` false; the token reports ``CKA_ALWAYS_SENSITIVE`` and
``CKA_NEVER_EXTRACTABLE``), labelled and identified by its ``kid`` (the RFC 7638
thumbprint of its public key). Redis stores only the record's public JWK and a reference,
an RFC 7512 URI ``pkcs11:token=...;id=...;object=...;type=private``. Signing sends
SHA-256 of the JWS signing input to the token (``CKM_ECDSA``); its raw R||S is the JWS
signature (normalised to low-S like the local signer's). When the lifecycle deletes a
record, the objects are destroyed in the token.

Importing a key into the token is refused by design: a key that was ever outside the
token (a local key, decrypted in a process to sign) cannot be made non-extractable after
the fact; the way from ``local`` to ``pkcs11`` is an ordinary rotation.

Library: python-pkcs11 (maintained, typed, a Cython binding that releases the GIL during
token calls); the optional extra ``tokensvc[pkcs11]``. See :mod:`tokensvc.keys.token_pool`
for threads, sessions and failures.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import NoSuchKey, PKCS11Error
from pkcs11.util.ec import encode_named_curve_parameters

from tokensvc.families import tokens
from tokensvc.keys.backend import BACKEND_FIELD, PKCS11, KeyRingError, SigningUnavailable
from tokensvc.keys.local import public_jwk
from tokensvc.keys.token_pool import TokenPool
from tokensvc_client.verifier import TOKEN_TYPE

log = logging.getLogger("tokensvc.keyring")
_P256_OID = "1.2.840.10045.3.1.7"
#: listings of a key's objects in one destroy (another destroyer may interrupt a few)
_DESTROY_ATTEMPTS = 5


class Pkcs11Signer:
    """A private key in the token, found by its id in each session that signs."""

    def __init__(self, backend: Pkcs11Backend, kid: str) -> None:
        self._backend = backend
        self._kid = kid

    @property
    def kid(self) -> str:
        return self._kid

    async def sign_token(self, claims: dict[str, Any], typ: str = TOKEN_TYPE) -> str:
        data = tokens.signing_input(self._kid, claims, typ)
        digest = hashlib.sha256(data.encode("ascii")).digest()
        raw = await self._backend.sign(self._kid, digest)
        return tokens.compact_jws(data, raw)


class Pkcs11Backend:
    """Key pairs in one PKCS#11 token (see the module doc)."""

    name = PKCS11

    def __init__(self, pool: TokenPool) -> None:
        self.pool = pool
        # (module generation, session id, kid) -> private key object
        self._keys: dict[tuple[int, int, str], Any] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> Pkcs11Backend | None:
        """The backend ``--pkcs11-*`` configure, or None without ``--pkcs11-module``."""
        if settings.pkcs11_module is None:
            return None
        token: str = settings.pkcs11_token or ""
        label: str | None = token
        slot: int | None = None
        if token.startswith("slot:"):
            label, slot = None, int(token.removeprefix("slot:"))
        pool = TokenPool(
            Path(settings.pkcs11_module),
            label,
            slot,
            Path(settings.pkcs11_pin_file),
            settings.pkcs11_sessions,
            settings.pkcs11_timeout,
        )
        return cls(pool)

    def problem(self) -> str | None:
        return self.pool.problem()

    def reference(self, kid: str) -> str:
        """The RFC 7512 URI of a key's private object in this token."""
        token = self.pool.token_label if self.pool.token_label is not None else ""
        where = f"token={quote(token, safe='')}" if token else f"slot-id={self.pool.slot}"
        return f"pkcs11:{where};id={quote(kid, safe='')};object={kid};type=private"

    # -- the backend interface ------------------------------------------------------------

    async def generate(self) -> dict[str, Any]:
        public = await self.pool.run(_generate)
        return {
            "kid": public["kid"],
            "public": public,
            BACKEND_FIELD: PKCS11,
            "ref": self.reference(public["kid"]),
        }

    def open(self, record: dict[str, Any]) -> Pkcs11Signer:
        ref = str(record.get("ref", ""))
        kid = str(record["kid"])
        if (
            self.pool.token_label is not None
            and f"token={quote(self.pool.token_label, safe='')};" not in ref
        ):
            raise KeyRingError(
                f"signing key {kid} is in another PKCS#11 token ({ref}), not in "
                f"--pkcs11-token {self.pool.token_label}"
            )
        return Pkcs11Signer(self, kid)

    async def destroy(self, record: dict[str, Any]) -> None:
        """Destroy the record's objects in the token (idempotent).

        Every worker and replica destroys deleted keys on its tick, so two may find the
        same objects and destroy them at once. The second then fails on an object the
        first has just destroyed, while listing or destroying it (SoftHSM answers
        CKR_OBJECT_HANDLE_INVALID, or CKR_FUNCTION_FAILED when both destroy at the same
        instant). Raised, that would mark the token unavailable and stop this process
        signing until it re-initialised, for an object that is gone as wanted. So after a
        failure the objects are listed again and what is left destroyed; only a failure
        that persists (:data:`_DESTROY_ATTEMPTS` listings) is the token's.
        """
        kid_id = _object_id(record)

        def destroy(session: Any) -> int:
            destroyed = 0
            for attempt in range(_DESTROY_ATTEMPTS):
                try:
                    for obj in list(session.get_objects({Attribute.ID: kid_id})):
                        obj.destroy()
                        destroyed += 1
                    return destroyed
                except PKCS11Error:
                    if attempt + 1 == _DESTROY_ATTEMPTS:
                        raise
            return destroyed

        count = await self.pool.run(destroy)
        self._forget(str(record["kid"]))
        log.info("destroyed %d token object(s) of key kid=%s", count, record["kid"])

    async def check(self, record: dict[str, Any] | None) -> None:
        if record is None:
            await self.pool.run(lambda session: None)
            return
        kid = str(record["kid"])

        def find(session: Any) -> None:  # a real lookup (no cache): is it still there?
            session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=kid.encode("ascii"))

        try:
            await self.pool.run(find)
        except NoSuchKey:
            reason = (
                f"the active key kid={kid} has no private key object in PKCS#11 {self.pool.name}"
            )
            self.pool.invalidate(reason)
            raise SigningUnavailable(reason) from None

    async def sign(self, kid: str, digest: bytes) -> bytes:
        """CKM_ECDSA over ``digest`` with the key ``kid``: raw R||S."""

        def sign(session: Any) -> bytes:
            return bytes(self._private(session, kid).sign(digest, mechanism=Mechanism.ECDSA))

        try:
            return await self.pool.run(sign)
        except NoSuchKey:
            reason = f"signing key kid={kid} not found in PKCS#11 {self.pool.name}"
            self.pool.invalidate(reason)
            raise SigningUnavailable(reason) from None

    # -- helpers (on the pool's threads) -------------------------------------------------

    def _private(self, session: Any, kid: str) -> Any:
        """The private key object ``kid`` as seen by ``session`` (looked up once)."""
        # the cache holds each session it has keys of, so no id() is reused for another
        entry = (self.pool.generation, id(session), kid)
        key = self._keys.get(entry)
        if key is None:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=kid.encode("ascii"))
            if self._keys and next(iter(self._keys))[0] != self.pool.generation:
                self._keys.clear()  # sessions of a re-initialised module
            self._keys[entry] = key
        return key

    def _forget(self, kid: str) -> None:
        for entry in [e for e in self._keys if e[2] == kid]:
            self._keys.pop(entry, None)


def _generate(session: Any) -> dict[str, Any]:
    """Generate a P-256 pair in the token under a temporary id, then give both objects
    the kid (its public key's thumbprint) as CKA_ID and CKA_LABEL; returns the public JWK.
    The token must report the private key sensitive and never extractable."""
    temporary = b"tokensvc-new-" + secrets.token_hex(8).encode("ascii")
    params = session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_P256_OID)}, local=True
    )
    public, private = params.generate_keypair(
        store=True,
        id=temporary,
        label="tokensvc-new",
        public_template={Attribute.TOKEN: True, Attribute.VERIFY: True},
        private_template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
        },
    )
    try:
        if private[Attribute.EXTRACTABLE] or not private[Attribute.SENSITIVE]:
            raise KeyRingError("the token made the new private key extractable: refused")
        key = jwk.JWK.from_pyca(
            ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), _ec_point(public[Attribute.EC_POINT])
            )
        )
        kid = key.thumbprint()
        for obj in (public, private):
            obj[Attribute.ID] = kid.encode("ascii")
            obj[Attribute.LABEL] = kid
    except BaseException:
        for obj in (public, private):
            obj.destroy()
        raise
    return public_jwk(key)


def _ec_point(raw: bytes) -> bytes:
    """The uncompressed point of CKA_EC_POINT: DER OCTET STRING as the standard says, or
    the bare point as some modules return it."""
    raw = bytes(raw)
    if len(raw) == 67 and raw[0] == 0x04 and raw[1] == 65:
        return raw[2:]
    return raw


def _object_id(record: dict[str, Any]) -> bytes:
    ref = str(record.get("ref", ""))
    for part in ref.removeprefix("pkcs11:").split(";"):
        name, _, value = part.partition("=")
        if name == "id":
            return unquote(value).encode("utf-8")
    return str(record["kid"]).encode("ascii")
