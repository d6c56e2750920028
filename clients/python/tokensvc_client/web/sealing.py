"""Encrypted, authenticated cookie values (AES-256-GCM) under the web backend's own keys.

A session cookie holds the session's tokens. Sealed, a cookie that leaks into a log, a
proxy or a browser extension's view is useless without the web backend's key, and a cookie
that anyone altered -- or sealed under another key -- opens to nothing (the request then
simply has no session).

Format: ``<kid>.<base64url(nonce || ciphertext+tag)>``. ``kid`` names the key (a hash of
it, so no configuration of names is needed); the cookie's name is the associated data, so a
sealed value cannot be moved from one cookie to another. Key rotation: the first key seals,
every key opens; put a new key first, keep the old one until the longest cookie lifetime
has passed, then drop it.

A value that does not open says why (:class:`SealError`: malformed, unknown key, failed
tag) and which key id it names, for the helper's log and audit hook -- never the value.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["CookieSealer", "SealError", "SealFailure", "generate_key"]

KEY_BYTES = 32
_NONCE_BYTES = 12
#: Browsers keep cookies up to about 4096 bytes (name, value and attributes).
MAX_COOKIE_VALUE = 3800
#: what a key id looks like (``key_id`` makes 8 characters); anything else is not one
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")


class SealFailure(enum.StrEnum):
    """Why a value does not open."""

    #: not ``<kid>.<base64url>``, too long, too short, not base64url
    MALFORMED = "malformed"
    #: names a key this sealer does not hold (dropped in a rotation, another deployment's)
    UNKNOWN_KEY = "unknown_key"
    #: the authentication tag fails: altered, truncated, or sealed for another cookie
    TAG_MISMATCH = "tag_mismatch"


class SealError(ValueError):
    """A value that does not open.

    Attributes:
        reason: why.
        key_id: the key id the value names, or ``""`` when it names none (a key id is
            public: it is a hash of the key; the rest of the value is never kept here).
    """

    def __init__(self, reason: SealFailure, key_id: str = "") -> None:
        super().__init__(f"{reason.value} (key id {key_id!r})")
        self.reason = reason
        self.key_id = key_id


def generate_key() -> bytes:
    """A new random 256-bit cookie key."""
    return AESGCM.generate_key(bit_length=KEY_BYTES * 8)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(key: bytes) -> str:
    """The short public name of ``key`` written into each cookie it seals."""
    return _b64(hashlib.sha256(b"tokensvc-web-cookie-key\x00" + key).digest()[:6])


class CookieSealer:
    """Seals and opens cookie values.

    Args:
        keys: 32-byte keys, the current one first; the others only open older cookies.

    Raises:
        ValueError: no key, a key that is not 32 bytes, or the same key twice.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        if isinstance(keys, bytes) or not keys:
            raise ValueError("cookie keys: give a non-empty list of 32-byte keys")
        if any(not isinstance(k, bytes) or len(k) != KEY_BYTES for k in keys):
            raise ValueError("cookie keys must be 32 random bytes each")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        if len(self._keys) != len(keys):
            raise ValueError("cookie keys: the same key is given twice")
        self._current = key_id(keys[0])

    def seal(self, name: str, plaintext: bytes) -> str:
        """Encrypt ``plaintext`` for the cookie ``name`` under the current key.

        Raises:
            ValueError: the sealed value would be too large for a browser cookie.
        """
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._keys[self._current].encrypt(nonce, plaintext, self._aad(name))
        value = f"{self._current}.{_b64(nonce + sealed)}"
        if len(value) > MAX_COOKIE_VALUE:
            raise ValueError(f"sealed cookie of {len(value)} bytes exceeds {MAX_COOKIE_VALUE}")
        return value

    def open(self, name: str, value: str) -> bytes | None:
        """The plaintext of a value sealed for ``name`` by one of the keys, else ``None``
        (tampered, truncated, another cookie's, an unknown or dropped key)."""
        try:
            return self.unseal(name, value)
        except SealError:
            return None

    def unseal(self, name: str, value: str) -> bytes:
        """The plaintext of a value sealed for ``name`` by one of the keys.

        Raises:
            SealError: it does not open, and why.
        """
        kid, dot, body = value.partition(".")
        if not dot or not _KEY_ID.fullmatch(kid):
            raise SealError(SealFailure.MALFORMED)
        if len(value) > MAX_COOKIE_VALUE:
            raise SealError(SealFailure.MALFORMED, kid)
        aead = self._keys.get(kid)
        if aead is None:
            raise SealError(SealFailure.UNKNOWN_KEY, kid)
        try:
            raw = _unb64(body)
        except (binascii.Error, ValueError):
            raise SealError(SealFailure.MALFORMED, kid) from None
        if len(raw) <= _NONCE_BYTES:
            raise SealError(SealFailure.MALFORMED, kid)
        try:
            return aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._aad(name))
        except InvalidTag:
            raise SealError(SealFailure.TAG_MISMATCH, kid) from None

    @staticmethod
    def _aad(name: str) -> bytes:
        return b"tokensvc-web-cookie\x00" + name.encode("utf-8")
