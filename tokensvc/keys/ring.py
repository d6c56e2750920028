"""The ES256 key ring, shared by every replica through Redis, and its lifecycle.

Each key is a record ``{kid, state, created_ms, activated_ms, ..., public, ...}`` in one
Redis hash. Its private half belongs to a key backend (:mod:`tokensvc.keys.backend`):
``local`` records carry the private JWK as a compact JWE under the operator's
key-encryption key (KEK; :mod:`tokensvc.keys.local`), ``pkcs11`` records only a reference
to a key pair that was generated in, and never leaves, a PKCS#11 token
(:mod:`tokensvc.keys.pkcs11`). New keys go to the backend the ring was configured with;
existing keys keep theirs, so moving between backends is an ordinary rotation.

Lifecycle (docs/design.md, Keys), every transition one Lua script on Redis's clock
(``lua/keys.lua``), so replicas agree on when it is due and exactly one performs it:

- ``pending``: published in the JWK Set, not signing. Created ``publish delay`` (JWKS
  max-age + leeway) before the active key is due for rotation; promoted once it has been
  published that long, so no verifier meets a ``kid`` it could not have fetched.
- ``active``: signs new tokens; exactly one.
- ``retired``: still published, signs nothing; deleted once every token it signed has
  expired (access-token lifetime + leeway after retirement). The script that deletes a
  ``pkcs11`` record leaves its reference in ``ts:{keyring}:destroy``; the next tick of a
  replica with the token destroys the object there.

Every replica runs :meth:`KeyRing.tick` each second; a ring version counter tells it when
to reload. ``rotate(now=True, revoke_old=True)`` is the emergency rotation for a
compromised key: the new key signs at once and every older key leaves the JWK Set.
The first replica to start on an empty Redis creates the first active key (SET NX).

The ring also keeps the deployment's symmetric secrets (:meth:`KeyRing.secret`): 256
random bits each, created once by the first replica (HSETNX) and stored in
``ts:{keyring}:secrets`` only as a JWE under the KEK, like the private keys (``rewrap``
re-encrypts them too). They must outlive KEK rotations, so they are not derived from the
KEK: the refresh-token MAC key (:mod:`tokensvc.families.tokens`) recognises tokens issued years
of rotations ago, and the subject-tag key decides which hash slot a subject lives in.

The parts: the ring's state, its reads and the deployment secrets are
:mod:`tokensvc.keys.ring_state`; the lifecycle operations (tick, rotate, retire, rewrap)
are :mod:`tokensvc.keys.rotation`; this module has :class:`KeyRing` itself (what signs,
on top of both) and the KEK file (:func:`load_kek`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from jwcrypto import jwk

from tokensvc.keys.backend import (
    PKCS11,
    KeyRingError,
    Signer,
    SigningUnavailable,
    backend_of,
)
from tokensvc.keys.local import SigningKey, jwe_kid, undecryptable
from tokensvc.keys.rotation import RingRotation
from tokensvc_client.verifier import TOKEN_TYPE, b64url_decode

__all__ = [
    "KeyRing",
    "KeyRingError",
    "SigningKey",
    "SigningUnavailable",
    "load_kek",
]

log = logging.getLogger("tokensvc.keyring")


def load_kek(path: Path | None, data_dir: Path) -> jwk.JWK:
    """Load the key-encryption key (a JWK with ``kty: oct``, 256 bits).

    Without ``path`` a development KEK is created in ``data_dir`` (mode 0600) and a
    warning is logged: production must provide its own. Either file is warned about when
    group or others may read it (a development KEK an older version wrote 0644 too).
    """
    if path is None:
        path = data_dir / "dev-kek.json"
        if not path.exists():
            _create_dev_kek(path)
        log.warning(
            "using a development key-encryption key from %s; set --kek-file in production", path
        )
    if path.stat().st_mode & 0o077:
        log.warning(
            "key-encryption key %s is readable by group or others (mode %o): chmod 600 it",
            path,
            path.stat().st_mode & 0o777,
        )
    try:
        kek = jwk.JWK.from_json(path.read_text())
    except OSError as err:
        raise KeyRingError(f"key-encryption key {path}: {err.strerror or err}") from None
    except Exception:
        # jwcrypto's own text is empty for some inputs; the file's content is never echoed
        raise KeyRingError(
            f"key-encryption key {path} is not a JSON Web Key: it must be a 256-bit oct JWK "
            '({"kty": "oct", "k": <32 random bytes, base64url>})'
        ) from None
    try:
        fits = kek.get("kty") == "oct" and len(b64url_decode(kek.get("k", ""))) == 32
    except (ValueError, TypeError):
        fits = False
    if not fits:
        raise KeyRingError(
            f"key-encryption key {path} is a JWK but not a 256-bit oct key "
            f"(kty {kek.get('kty')!r}): it must be a 256-bit oct JWK"
        )
    return kek


def _create_dev_kek(path: Path) -> None:
    """Write a new 256-bit KEK to ``path`` (mode 0600) unless another process already has:
    the key is written to a private temporary file that is then hard-linked into place,
    so concurrent starts (workers, replicas on one data directory) all read one complete
    key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dev-kek-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(jwk.JWK.generate(kty="oct", size=256).export())
        with contextlib.suppress(FileExistsError):  # another start won: use its key
            os.link(tmp, path)
    finally:
        os.unlink(tmp)


class KeyRing(RingRotation):
    """Public keys for GetKeys/Introspect, the active private key for signing, and the
    lifecycle operations (one Lua script each).

    Args:
        kek: the key-encryption key new and re-wrapped records are encrypted under.
        previous_keks: older KEKs still accepted for decryption (KEK rotation).
        pkcs11: the PKCS#11 backend, if this process has a token (needed to sign with, or
            create, a ``pkcs11`` key).
        new_keys: the backend new keys are created in (``local`` or ``pkcs11``).
    """

    @property
    def signing(self) -> Signer:
        if self._signing is None:
            raise KeyRingError("no active signing key")
        return self._signing

    async def sign_token(self, claims: dict[str, Any], typ: str = TOKEN_TYPE) -> str:
        """An access token for ``claims`` (a Transaction Token with its ``typ``), signed by
        the active key's backend.

        Raises:
            SigningUnavailable: the active key's backend cannot sign now.
        """
        return await self.signing.sign_token(claims, typ)

    def check_signing(self) -> None:
        """Raise :class:`SigningUnavailable` if the active key's backend is known to be
        down (no I/O): Issue and Refresh check it before they change anything in Redis,
        so an HSM outage does not consume a refresh token or store a session it cannot
        sign for."""
        active = self.records.get(self._signing.kid) if self._signing else None
        if active is not None and backend_of(active) == PKCS11 and self._pkcs11 is not None:
            problem = self._pkcs11.problem()
            if problem:
                raise SigningUnavailable(problem)


#: (kept for callers of the names this module had before the backends)
_undecryptable = undecryptable
_jwe_kid = jwe_kid
