"""The key ring's state: the records in Redis, the JWK Set they publish, the active key
opened in its backend, and the deployment secrets; reading them (:meth:`RingState.load`)
and knowing when to read again (the ring version counter).

The keys of one ring live in one Redis hash (:data:`RING_KEY`), the active ``kid`` in
:data:`ACTIVE_KEY`, a counter every change increments in :data:`VERSION_KEY`. The first
replica to start on an empty Redis creates the first active key (SET NX); one that finds
the ring gone although it had one (or the deployment's other traces) logs that Redis lost
its data. The deployment secrets (:meth:`RingState.secret`, in :data:`SECRETS_KEY`) are
256 random bits each, created once (HSETNX), stored only as a JWE under the KEK.

:class:`RingState` is the base of :class:`tokensvc.keys.ring.KeyRing`; the lifecycle
operations are in :mod:`tokensvc.keys.rotation`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterable
from typing import Any, Final

from jwcrypto import jwe, jwk

from tokensvc.keys.backend import LOCAL, PKCS11, KeyBackend, KeyRingError, Signer, backend_of
from tokensvc.keys.local import LocalBackend, jwe_kid, undecryptable
from tokensvc.redis.connection import RedisClient
from tokensvc.store import guarded, text
from tokensvc.store.keyspace import AUDIT_STREAM, REVOCATIONS, RING_VERSION
from tokensvc_client.verifier import KeySet

log = logging.getLogger("tokensvc.keyring")

RING_KEY: Final = "ts:{keyring}:keys"
ACTIVE_KEY: Final = "ts:{keyring}:active"
VERSION_KEY: Final = RING_VERSION
SECRETS_KEY: Final = "ts:{keyring}:secrets"
#: kid -> record of pkcs11 keys the lifecycle deleted, whose token objects are to go
DESTROY_KEY: Final = "ts:{keyring}:destroy"
#: the deployment secrets every replica loads at start (see RingState.secret)
SECRET_NAMES: Final = ("refresh-mac", "subject-tag")
PUBLISHED_STATES: Final = frozenset({"pending", "active", "retired"})

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


class RingState:
    """The ring as this process last read it, and the reads (see the module doc); the
    arguments are those of :class:`tokensvc.keys.ring.KeyRing`."""

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

    async def _new_record(self, state: str) -> dict[str, Any]:
        return {**(await self._new_keys.generate()), "state": state}

    async def _discard_unused(self, record: dict[str, Any]) -> None:
        """Destroy a key this replica created that the script did not take (another
        replica's was first, or a pending key already existed)."""
        if backend_of(record) == LOCAL:
            return
        if not await guarded(self._redis.hexists, RING_KEY, record["kid"]):
            await self._backend(record).destroy(record)
            log.info("destroyed the unused new key kid=%s", record["kid"])

    def _wrap_secret(self, value: bytes) -> str:
        token = jwe.JWE(value, protected={"alg": "A256KW", "enc": "A256GCM", "kid": self._kek_id})
        token.add_recipient(self._kek)
        return str(token.serialize(compact=True))

    def _unwrap_secret(self, name: str, stored: str) -> bytes:
        try:
            token = jwe.JWE()
            token.deserialize(stored, key=self._keks.get(jwe_kid(stored), self._kek))
            value = bytes(token.payload)
        except Exception:
            raise undecryptable(f"deployment secret {name}") from None
        if len(value) != 32:
            raise KeyRingError(f"deployment secret {name} is not 256 bits")
        return value
