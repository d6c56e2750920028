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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from jwcrypto import jwe, jwk

from tokensvc.keys.backend import (
    LOCAL,
    PKCS11,
    KeyBackend,
    KeyRingError,
    Signer,
    SigningUnavailable,
    backend_of,
)
from tokensvc.keys.local import LocalBackend, SigningKey, jwe_kid, undecryptable
from tokensvc.redis.connection import RedisClient
from tokensvc.store import guarded, text
from tokensvc.store.keyspace import AUDIT_STREAM, REVOCATIONS, RING_VERSION
from tokensvc_client.verifier import TOKEN_TYPE, KeySet, b64url_decode

__all__ = [
    "KeyRing",
    "KeyRingError",
    "Lifecycle",
    "SigningKey",
    "SigningUnavailable",
    "load_kek",
]

log = logging.getLogger("tokensvc.keyring")

RING_KEY: Final = "ts:{keyring}:keys"
ACTIVE_KEY: Final = "ts:{keyring}:active"
VERSION_KEY: Final = RING_VERSION
SECRETS_KEY: Final = "ts:{keyring}:secrets"
#: kid -> record of pkcs11 keys the lifecycle deleted, whose token objects are to go
DESTROY_KEY: Final = "ts:{keyring}:destroy"
#: the deployment secrets every replica loads at start (see KeyRing.secret)
SECRET_NAMES: Final = ("refresh-mac", "subject-tag")
PUBLISHED_STATES: Final = frozenset({"pending", "active", "retired"})

_REPLACE_IF_UNCHANGED = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 0
"""
_BOOTSTRAP = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX') then
  local t = redis.call('TIME')
  local record = cjson.decode(ARGV[2])
  record.created_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  record.activated_ms = record.created_ms
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
  redis.call('INCR', KEYS[3])
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """Durations of the key lifecycle, ms (see the module doc)."""

    rotation_interval_ms: int
    publish_delay_ms: int
    keep_after_retire_ms: int

    @classmethod
    def from_settings(cls, settings: Any) -> Lifecycle:
        return cls(
            settings.key_rotation_interval * 1000,
            (settings.jwks_max_age + settings.leeway) * 1000,
            (settings.access_ttl + settings.leeway) * 1000,
        )


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


class KeyRing:
    """Public keys for GetKeys/Introspect, the active private key for signing, and the
    lifecycle operations (one Lua script each).

    Args:
        kek: the key-encryption key new and re-wrapped records are encrypted under.
        previous_keks: older KEKs still accepted for decryption (KEK rotation).
        pkcs11: the PKCS#11 backend, if this process has a token (needed to sign with, or
            create, a ``pkcs11`` key).
        new_keys: the backend new keys are created in (``local`` or ``pkcs11``).
    """

    def __init__(
        self,
        redis: RedisClient,
        kek: jwk.JWK,
        previous_keks: Iterable[jwk.JWK] = (),
        *,
        pkcs11: KeyBackend | None = None,
        new_keys: str = LOCAL,
    ) -> None:
        self._redis = redis
        self._kek = kek
        self._kek_id = kek.thumbprint()
        self._keks = {k.thumbprint(): k for k in (*previous_keks, kek)}
        self._local = LocalBackend(kek, previous_keks)
        self._pkcs11 = pkcs11
        if new_keys == PKCS11 and pkcs11 is None:
            raise KeyRingError("new keys in pkcs11 need a PKCS#11 token (--pkcs11-module)")
        self._new_keys: KeyBackend = pkcs11 if new_keys == PKCS11 and pkcs11 else self._local
        self._bootstrap = redis.register_script(_BOOTSTRAP)
        self._lifecycle = redis.register_script(
            resources.files("tokensvc.keys").joinpath("keys.lua").read_text()
        )
        self._replace = redis.register_script(_REPLACE_IF_UNCHANGED)
        self._secrets: dict[str, bytes] = {}
        self._signing: Signer | None = None
        self.public = KeySet({})
        self.jwks_json = '{"keys":[]}'
        self.records: dict[str, dict[str, Any]] = {}
        self.version = -1
        self._loaded_at = 0.0
        self._catching_up = asyncio.Lock()

    async def reload_if_stale(self, min_interval: float = 5.0) -> bool:
        """Reload after an unknown kid, at most once per ``min_interval`` seconds.

        Returns whether a reload happened (so a hostile stream of unknown kids costs at
        most one Redis read per interval).
        """
        if time.monotonic() - self._loaded_at < min_interval:
            return False
        await self.load()
        return True

    async def catch_up(self, version: int) -> bool:
        """Reload now if Redis holds a newer ring ``version`` than this process (read by
        Introspect with each token's state, so an emergency key revocation on another
        replica counts at once, not at the next tick); one reload for concurrent callers.
        Returns whether the ring was reloaded."""
        if version <= self.version:
            return False
        async with self._catching_up:
            if version <= self.version:
                return False
            await self.load()
            return True

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

    def _backend(self, record: dict[str, Any]) -> KeyBackend:
        """The backend holding ``record``'s private key.

        Raises:
            KeyRingError: a pkcs11 key, and this process has no token configured.
        """
        if backend_of(record) == LOCAL:
            return self._local
        if backend_of(record) == PKCS11 and self._pkcs11 is not None:
            return self._pkcs11
        raise KeyRingError(
            f"signing key {record.get('kid')} is held in a PKCS#11 token "
            f"({record.get('ref', backend_of(record))}): start with --pkcs11-module, "
            "--pkcs11-token and --pkcs11-pin-file"
        )

    def secret(self, name: str) -> bytes:
        """A deployment secret (one of :data:`SECRET_NAMES`), loaded by :meth:`load`."""
        try:
            return self._secrets[name]
        except KeyError:
            raise KeyRingError(f"deployment secret {name} is not loaded") from None

    async def _load_secrets(self) -> None:
        for name in SECRET_NAMES:
            if name in self._secrets:
                continue
            fresh = self._wrap_secret(os.urandom(32))
            await guarded(self._redis.hsetnx, SECRETS_KEY, name, fresh)  # the first one wins
            stored = text(await guarded(self._redis.hget, SECRETS_KEY, name))
            self._secrets[name] = self._unwrap_secret(name, stored)

    async def load(self) -> None:
        """Read the ring from Redis, creating the first key if there is none."""
        await self._load_secrets()
        if not await guarded(self._redis.exists, ACTIVE_KEY):
            # a ring this process had, or the traces of a running deployment, mean Redis
            # lost its data (restarted empty, a failover to an empty replica, a flush)
            lost = self._signing is not None or bool(
                await guarded(self._redis.exists, REVOCATIONS, AUDIT_STREAM)
            )
            record = await self._new_record("active")
            created = await guarded(
                self._bootstrap,
                keys=[RING_KEY, ACTIVE_KEY, VERSION_KEY],
                args=[record["kid"], json.dumps(record)],
            )
            if created and lost:
                log.warning(
                    "Redis holds no key ring although this deployment had one: it lost its "
                    "data (restarted without persistence, failed over to an empty replica, or "
                    "was flushed); every session, refresh token and revocation is gone and "
                    "users must log in again. Created a new signing key kid=%s",
                    record["kid"],
                )
            elif created:
                log.info("created the first signing key kid=%s", record["kid"])
            else:
                await self._discard_unused(record)
        self._loaded_at = time.monotonic()
        # the version first: a change landing between the reads is picked up next tick
        version = await guarded(self._redis.get, VERSION_KEY)
        active_kid = await guarded(self._redis.get, ACTIVE_KEY)
        raw = await guarded(self._redis.hgetall, RING_KEY)
        if self._apply(text(active_kid), {text(k): json.loads(v) for k, v in raw.items()}):
            await self.check_active()
        if self.version < 0 and self._pkcs11 is not None:
            await self._pkcs11.check(None)  # start-up: the token is there, the PIN works
        self.version = int(version or 0)

    async def check_active(self) -> None:
        """Prove the active key usable where it lives (a pkcs11 key: its object is in the
        token and the token answers; a local key was decrypted already).

        Raises:
            SigningUnavailable: its token does not answer, or has no such object.
        """
        active = self.records.get(self._signing.kid) if self._signing else None
        if active is not None and backend_of(active) != LOCAL:
            await self._backend(active).check(active)

    def _apply(self, active_kid: str, records: dict[str, dict[str, Any]]) -> bool:
        """Take a ring read from Redis; returns whether the active key changed."""
        if active_kid not in records:
            raise KeyRingError(f"active key {active_kid} has no record")
        changed = self._signing is None or self._signing.kid != active_kid
        if changed:
            self._signing = self._backend(records[active_kid]).open(records[active_kid])
            log.info(
                "signing with key kid=%s backend=%s", active_kid, backend_of(records[active_kid])
            )
        published = [r["public"] for r in records.values() if r["state"] in PUBLISHED_STATES]
        self.jwks_json = json.dumps({"keys": published}, separators=(",", ":"))
        self.public = KeySet.from_jwks(self.jwks_json)
        self.records = records
        return changed

    # -- lifecycle -----------------------------------------------------------------------

    async def _run(self, op: str, *args: Any) -> tuple[str, int]:
        reply = await guarded(
            self._lifecycle, keys=[RING_KEY, ACTIVE_KEY, VERSION_KEY, DESTROY_KEY], args=[op, *args]
        )
        status, version = text(reply[0]), int(reply[1])
        if version != self.version:
            await self.load()
        return status, version

    async def tick(self, lifecycle: Lifecycle) -> None:
        """Run the transitions that are due (any replica may call this at any time)."""
        timing = (
            lifecycle.rotation_interval_ms,
            lifecycle.publish_delay_ms,
            lifecycle.keep_after_retire_ms,
        )
        status, _ = await self._run("tick", *timing)
        if status == "need_key":
            try:
                record = await self._new_record("pending")
            except SigningUnavailable as err:
                # the active key still signs; the next tick tries again
                log.warning("cannot create the next signing key: %s", err)
            else:
                await self._run("tick", *timing, json.dumps(record))
                await self._discard_unused(record)
        if self._pkcs11 is not None:
            await self._destroy_deleted()
            await self.check_active()

    async def rotate(self, lifecycle: Lifecycle, *, now: bool, revoke_old: bool) -> None:
        """Add a new key: pending (signs after the publish delay) or, with ``now``, active
        at once; ``revoke_old`` (with ``now``) removes every older key from the JWK Set."""
        if revoke_old and not now:
            raise ValueError("revoke_old needs now: the old key signs until a new one does")
        record = await self._new_record("pending")
        args = (lifecycle.publish_delay_ms, int(now), int(revoke_old), json.dumps(record))
        await self._run("rotate", *args)
        await self._discard_unused(record)
        if self._pkcs11 is not None:
            await self._destroy_deleted()

    async def _discard_unused(self, record: dict[str, Any]) -> None:
        """Destroy a key this replica created that the script did not take (another
        replica's was first, or a pending key already existed)."""
        if backend_of(record) == LOCAL:
            return
        if not await guarded(self._redis.hexists, RING_KEY, record["kid"]):
            await self._backend(record).destroy(record)
            log.info("destroyed the unused new key kid=%s", record["kid"])

    async def _destroy_deleted(self) -> None:
        """Destroy the token objects of pkcs11 keys the lifecycle has deleted (retired past
        their last token's life, revoked by an emergency rotation, abandoned pending)."""
        for kid, stored in (await guarded(self._redis.hgetall, DESTROY_KEY)).items():
            record = json.loads(stored)
            try:
                await self._backend(record).destroy(record)
            except SigningUnavailable as err:
                log.warning("cannot destroy deleted key kid=%s yet: %s", text(kid), err)
                return
            await guarded(self._redis.hdel, DESTROY_KEY, kid)
            log.info("destroyed deleted key kid=%s in its token", text(kid))

    async def retire(self, kid: str) -> str:
        """Abandon a pending key; returns 'ok', 'unknown' or 'active' (refused)."""
        status, _ = await self._run("retire", kid)
        return status

    async def rewrap(self) -> int:
        """Re-encrypt every private key and deployment secret not yet under the current
        KEK; returns how many private keys."""
        for name, stored in (await guarded(self._redis.hgetall, SECRETS_KEY)).items():
            if _jwe_kid(text(stored)) != self._kek_id:
                value = self._wrap_secret(self._unwrap_secret(text(name), text(stored)))
                await guarded(self._replace, keys=[SECRETS_KEY], args=[name, stored, value])
        raw = await guarded(self._redis.hgetall, RING_KEY)
        args: list[str] = []
        for kid, stored in raw.items():
            record = json.loads(stored)
            if backend_of(record) != LOCAL or _jwe_kid(record["private"]) == self._kek_id:
                continue  # a pkcs11 key has nothing under the KEK
            key = self._local.decrypt(record)
            # the script replaces a record only if it still reads exactly as stored here
            wrapped = self._local.wrap(key)
            args += [text(kid), text(stored), json.dumps({**record, "private": wrapped})]
        if not args:
            return 0
        await self._run("rewrap", *args)
        await self.load()
        return sum(
            1
            for kid in args[0::3]
            if _jwe_kid(self.records.get(kid, {}).get("private", "")) == self._kek_id
        )

    # -- records -------------------------------------------------------------------------

    async def _new_record(self, state: str) -> dict[str, Any]:
        return {**(await self._new_keys.generate()), "state": state}

    def _wrap_secret(self, value: bytes) -> str:
        token = jwe.JWE(value, protected={"alg": "A256KW", "enc": "A256GCM", "kid": self._kek_id})
        token.add_recipient(self._kek)
        return str(token.serialize(compact=True))

    def _unwrap_secret(self, name: str, stored: str) -> bytes:
        try:
            token = jwe.JWE()
            token.deserialize(stored, key=self._keks.get(_jwe_kid(stored), self._kek))
            value = bytes(token.payload)
        except Exception:
            raise _undecryptable(f"deployment secret {name}") from None
        if len(value) != 32:
            raise KeyRingError(f"deployment secret {name} is not 256 bits")
        return value


#: (kept for callers of the names this module had before the backends)
_undecryptable = undecryptable
_jwe_kid = jwe_kid
