"""The ES256 key ring, shared by every replica through Redis, and its lifecycle.

Each key is a record ``{kid, state, created_ms, activated_ms, ..., public, private}`` in
one Redis hash; the private JWK is stored only as a compact JWE (A256KW + A256GCM) under
the operator's key-encryption key (KEK), whose thumbprint is the JWE's ``kid`` (so a
previous KEK can still decrypt during a KEK rotation, and ``rewrap`` re-encrypts).

Lifecycle (docs/design.md, Keys), every transition one Lua script on Redis's clock
(``lua/keys.lua``), so replicas agree on when it is due and exactly one performs it:

- ``pending``: published in the JWK Set, not signing. Created ``publish delay`` (JWKS
  max-age + leeway) before the active key is due for rotation; promoted once it has been
  published that long, so no verifier meets a ``kid`` it could not have fetched.
- ``active``: signs new tokens; exactly one.
- ``retired``: still published, signs nothing; deleted once every token it signed has
  expired (access-token lifetime + leeway after retirement).

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

from tokensvc.errors import TokensvcError
from tokensvc.redis.connection import RedisClient
from tokensvc.store import guarded, text
from tokensvc.store.keyspace import AUDIT_STREAM, REVOCATIONS
from tokensvc_client.verifier import ALGORITHM, KeySet, b64url_decode

log = logging.getLogger("tokensvc.keyring")

RING_KEY: Final = "ts:{keyring}:keys"
ACTIVE_KEY: Final = "ts:{keyring}:active"
VERSION_KEY: Final = "ts:{keyring}:version"
SECRETS_KEY: Final = "ts:{keyring}:secrets"
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


class KeyRingError(TokensvcError, RuntimeError):
    """The key ring cannot be used (bad KEK, corrupt record, no active key)."""

    code = "key_ring"


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


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    key: jwk.JWK


class KeyRing:
    """Public keys for GetKeys/Introspect, the active private key for signing, and the
    lifecycle operations (one Lua script each).

    Args:
        kek: the key-encryption key new and re-wrapped records are encrypted under.
        previous_keks: older KEKs still accepted for decryption (KEK rotation).
    """

    def __init__(
        self, redis: RedisClient, kek: jwk.JWK, previous_keks: Iterable[jwk.JWK] = ()
    ) -> None:
        self._redis = redis
        self._kek = kek
        self._kek_id = kek.thumbprint()
        self._keks = {k.thumbprint(): k for k in (*previous_keks, kek)}
        self._bootstrap = redis.register_script(_BOOTSTRAP)
        self._lifecycle = redis.register_script(
            resources.files("tokensvc.keys").joinpath("keys.lua").read_text()
        )
        self._replace = redis.register_script(_REPLACE_IF_UNCHANGED)
        self._secrets: dict[str, bytes] = {}
        self._signing: SigningKey | None = None
        self.public = KeySet({})
        self.jwks_json = '{"keys":[]}'
        self.records: dict[str, dict[str, Any]] = {}
        self.version = -1
        self._loaded_at = 0.0

    async def reload_if_stale(self, min_interval: float = 5.0) -> bool:
        """Reload after an unknown kid, at most once per ``min_interval`` seconds.

        Returns whether a reload happened (so a hostile stream of unknown kids costs at
        most one Redis read per interval).
        """
        if time.monotonic() - self._loaded_at < min_interval:
            return False
        await self.load()
        return True

    @property
    def signing(self) -> SigningKey:
        if self._signing is None:
            raise KeyRingError("no active signing key")
        return self._signing

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
            record = self._new_record("active")
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
        self._loaded_at = time.monotonic()
        # the version first: a change landing between the reads is picked up next tick
        version = await guarded(self._redis.get, VERSION_KEY)
        active_kid = await guarded(self._redis.get, ACTIVE_KEY)
        raw = await guarded(self._redis.hgetall, RING_KEY)
        self._apply(text(active_kid), {text(k): json.loads(v) for k, v in raw.items()})
        self.version = int(version or 0)

    def _apply(self, active_kid: str, records: dict[str, dict[str, Any]]) -> None:
        if active_kid not in records:
            raise KeyRingError(f"active key {active_kid} has no record")
        if self._signing is None or self._signing.kid != active_kid:
            self._signing = SigningKey(active_kid, self._decrypt(records[active_kid]))
            log.info("signing with key kid=%s", active_kid)
        published = [r["public"] for r in records.values() if r["state"] in PUBLISHED_STATES]
        self.jwks_json = json.dumps({"keys": published}, separators=(",", ":"))
        self.public = KeySet.from_jwks(self.jwks_json)
        self.records = records

    # -- lifecycle -----------------------------------------------------------------------

    async def _run(self, op: str, *args: Any) -> tuple[str, int]:
        reply = await guarded(
            self._lifecycle, keys=[RING_KEY, ACTIVE_KEY, VERSION_KEY], args=[op, *args]
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
            await self._run("tick", *timing, json.dumps(self._new_record("pending")))

    async def rotate(self, lifecycle: Lifecycle, *, now: bool, revoke_old: bool) -> None:
        """Add a new key: pending (signs after the publish delay) or, with ``now``, active
        at once; ``revoke_old`` (with ``now``) removes every older key from the JWK Set."""
        if revoke_old and not now:
            raise ValueError("revoke_old needs now: the old key signs until a new one does")
        record = json.dumps(self._new_record("pending"))
        await self._run("rotate", lifecycle.publish_delay_ms, int(now), int(revoke_old), record)

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
            if _jwe_kid(record["private"]) == self._kek_id:
                continue
            key = self._decrypt(record)
            # the script replaces a record only if it still reads exactly as stored here
            args += [text(kid), text(stored), json.dumps({**record, "private": self._wrap(key)})]
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

    def _new_record(self, state: str) -> dict[str, Any]:
        key = jwk.JWK.generate(kty="EC", crv="P-256")
        kid = key.thumbprint()
        public = json.loads(key.export_public())
        public.update({"kid": kid, "use": "sig", "alg": ALGORITHM})
        return {"kid": kid, "state": state, "public": public, "private": self._wrap(key)}

    def _wrap(self, key: jwk.JWK) -> str:
        token = jwe.JWE(
            key.export_private().encode("utf-8"),
            protected={"alg": "A256KW", "enc": "A256GCM", "kid": self._kek_id, "cty": "jwk+json"},
        )
        token.add_recipient(self._kek)
        return str(token.serialize(compact=True))

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

    def _decrypt(self, record: dict[str, Any]) -> jwk.JWK:
        kek = self._keks.get(_jwe_kid(record.get("private", "")), self._kek)
        try:
            token = jwe.JWE()
            token.deserialize(record["private"], key=kek)
            key = jwk.JWK.from_json(token.payload.decode("utf-8"))
        except Exception:
            raise _undecryptable(f"signing key {record.get('kid')}") from None
        return key


def _undecryptable(what: str) -> KeyRingError:
    """The start-up error for state in Redis that no KEK of this process decrypts: the
    operator's fix is a flag, so name the flags."""
    return KeyRingError(
        f"cannot decrypt {what} stored in Redis: wrong key-encryption key? It was encrypted "
        "under another KEK: check --kek-file (without it, the development KEK of --data-dir "
        "is used), or, during a KEK rotation, pass the old KEK with --previous-kek-file"
    )


def _jwe_kid(compact: str) -> str:
    """The ``kid`` of a compact JWE's protected header ('' if unreadable)."""
    try:
        header = json.loads(b64url_decode(compact.split(".", 1)[0]))
        return str(header.get("kid", ""))
    except (ValueError, AttributeError):
        return ""
