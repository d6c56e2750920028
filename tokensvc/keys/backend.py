"""The private-key side of the key ring, behind one small interface.

The ring (:mod:`tokensvc.keys.ring`, its lifecycle in :mod:`tokensvc.keys.rotation`) owns
the lifecycle -- which key is pending, active or retired, on Redis's clock -- and the JWK Set
it publishes. Everything that touches a
*private* key is a backend's: creating a key pair, signing with it, destroying it. Two
backends implement it:

- ``local`` (:mod:`tokensvc.keys.local`): the key pair is generated in this process and
  stored in Redis as a JWE under the operator's key-encryption key; signing decrypts it
  into memory once per key.
- ``pkcs11`` (:mod:`tokensvc.keys.pkcs11`): the key pair is generated inside a PKCS#11
  token (an HSM, a cloud KMS's PKCS#11 library, SoftHSM) and never leaves it; Redis stores
  only a reference to the object and the public JWK.

A key record in Redis names its backend (``"backend": "pkcs11"``); a record without the
field is a local one, so records written before backends existed work unchanged.
"""

from __future__ import annotations

from typing import Any, Protocol

from tokensvc.errors import TokensvcError
from tokensvc_client.verifier import TOKEN_TYPE

#: the record field naming a key's backend (absent: ``local``)
BACKEND_FIELD = "backend"
LOCAL = "local"
PKCS11 = "pkcs11"
BACKENDS = (LOCAL, PKCS11)


class KeyRingError(TokensvcError, RuntimeError):
    """The key ring cannot be used (bad KEK, corrupt record, no active key, a key's token
    not found). At start-up its message is the one line ``serve`` prints."""

    code = "key_ring"


class SigningUnavailable(KeyRingError):
    """The backend holding the key cannot sign right now (token removed, logged out, PIN
    refused, too slow). Issue and Refresh answer UNAVAILABLE; health is NOT_SERVING."""

    code = "signing_unavailable"


class Signer(Protocol):
    """One private key, ready to sign."""

    @property
    def kid(self) -> str: ...

    async def sign_token(self, claims: dict[str, Any], typ: str = TOKEN_TYPE) -> str:
        """The compact ES256 JWS of ``claims`` (:func:`tokensvc.families.tokens.sign_access_token`'s
        format; ``typ``: the JOSE type, a Transaction Token's for those), signed with this key.

        Raises:
            SigningUnavailable: the key's holder cannot sign now.
        """
        ...


class KeyBackend(Protocol):
    """Creates, opens and destroys the private halves of key records."""

    name: str

    async def generate(self) -> dict[str, Any]:
        """A new key pair: the record fields ``kid``, ``public`` (the public JWK with kid,
        use and alg) and whatever the backend needs to find the private key again."""
        ...

    def open(self, record: dict[str, Any]) -> Signer:
        """A signer for ``record``'s private key (cheap; no I/O for a local key).

        Raises:
            KeyRingError: the record cannot be used by this backend.
        """
        ...

    async def destroy(self, record: dict[str, Any]) -> None:
        """Destroy the private key of a record the lifecycle has deleted (idempotent).

        Raises:
            SigningUnavailable: the key's holder cannot be reached now (try again later).
        """
        ...

    async def check(self, record: dict[str, Any] | None) -> None:
        """Prove ``record``'s private key usable now (it exists where it should, and its
        holder answers); without a record, that the holder answers.

        Raises:
            SigningUnavailable: naming why not.
        """
        ...

    def problem(self) -> str | None:
        """Why this backend cannot sign right now, as far as it knows without I/O (None:
        no known problem)."""
        ...


def backend_of(record: dict[str, Any]) -> str:
    """The backend a record's private key lives in."""
    return str(record.get(BACKEND_FIELD, LOCAL))


def pkcs11_backend(settings: Any) -> KeyBackend | None:
    """The PKCS#11 backend ``--pkcs11-*`` configure (None without ``--pkcs11-module``);
    python-pkcs11 is imported only then (the optional extra ``tokensvc[pkcs11]``).

    Raises:
        KeyRingError: python-pkcs11 is not installed.
    """
    if getattr(settings, "pkcs11_module", None) is None:
        return None
    try:
        from tokensvc.keys.pkcs11 import Pkcs11Backend
    except ImportError as err:
        raise KeyRingError(
            f"--pkcs11-module needs python-pkcs11 (pip install 'tokensvc[pkcs11]'): {err}"
        ) from None
    return Pkcs11Backend.from_settings(settings)
