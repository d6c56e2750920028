"""The ES256 key ring, shared by every replica through Redis.

Each key is a record ``{kid, state, created_at, public, private}`` in one Redis hash; the
private JWK is stored only as a compact JWE (A256KW + A256GCM) under the operator's
key-encryption key (KEK). States follow SPEC.md section 6: ``pending`` (published, not
signing), ``active`` (signs; exactly one), ``retired`` (published until its tokens expire).
The first replica to start on an empty Redis creates the first active key; the others load
it (an atomic SET NX decides the race).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis.asyncio as aioredis
from jwcrypto import jwe, jwk

from tokensvc.store import guarded
from tokensvc_client.verifier import ALGORITHM, KeySet, b64url_decode

log = logging.getLogger(__name__)

RING_KEY: Final = "ts:{keyring}:keys"
ACTIVE_KEY: Final = "ts:{keyring}:active"
PUBLISHED_STATES: Final = frozenset({"pending", "active", "retired"})

_BOOTSTRAP = """
if redis.call('SET', KEYS[2], ARGV[1], 'NX') then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class KeyRingError(RuntimeError):
    """The key ring cannot be used (bad KEK, corrupt record, no active key)."""


def load_kek(path: Path | None, data_dir: Path) -> jwk.JWK:
    """Load the key-encryption key (a JWK with ``kty: oct``, 256 bits).

    Without ``path`` a development KEK is created in ``data_dir`` (mode 0600) and a
    warning is logged: production must provide its own.
    """
    if path is None:
        path = data_dir / "dev-kek.json"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(jwk.JWK.generate(kty="oct", size=256).export())
        log.warning(
            "using a development key-encryption key from %s; set --kek-file in production", path
        )
    try:
        kek = jwk.JWK.from_json(path.read_text())
        if kek.get("kty") != "oct" or len(b64url_decode(kek.get("k", ""))) != 32:
            raise ValueError("not a 256-bit oct JWK")
    except Exception as err:
        raise KeyRingError(f"key-encryption key {path} must be a 256-bit oct JWK: {err}") from None
    return kek


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    key: jwk.JWK


class KeyRing:
    """Public keys for GetKeys/Introspect and the active private key for signing."""

    def __init__(self, redis: aioredis.Redis, kek: jwk.JWK) -> None:
        self._redis = redis
        self._kek = kek
        self._kek_id = kek.thumbprint()
        self._bootstrap = redis.register_script(_BOOTSTRAP)
        self._signing: SigningKey | None = None
        self.public = KeySet({})
        self.jwks_json = '{"keys":[]}'
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

    async def load(self) -> None:
        """Read the ring from Redis, creating the first key if there is none."""
        if not await guarded(self._redis.exists, ACTIVE_KEY):
            record = self._new_record("active")
            created = await guarded(
                self._bootstrap,
                keys=[RING_KEY, ACTIVE_KEY],
                args=[record["kid"], json.dumps(record)],
            )
            if created:
                log.info("created the first signing key kid=%s", record["kid"])
        self._loaded_at = time.monotonic()
        active_kid = await guarded(self._redis.get, ACTIVE_KEY)
        raw = await guarded(self._redis.hgetall, RING_KEY)
        self._apply(_text(active_kid), {_text(k): json.loads(v) for k, v in raw.items()})

    def _apply(self, active_kid: str, records: dict[str, dict[str, Any]]) -> None:
        if active_kid not in records:
            raise KeyRingError(f"active key {active_kid} has no record")
        if self._signing is None or self._signing.kid != active_kid:
            self._signing = SigningKey(active_kid, self._decrypt(records[active_kid]))
        published = [r["public"] for r in records.values() if r["state"] in PUBLISHED_STATES]
        self.jwks_json = json.dumps({"keys": published}, separators=(",", ":"))
        self.public = KeySet.from_jwks(self.jwks_json)

    def _new_record(self, state: str) -> dict[str, Any]:
        key = jwk.JWK.generate(kty="EC", crv="P-256")
        kid = key.thumbprint()
        public = json.loads(key.export_public())
        public.update({"kid": kid, "use": "sig", "alg": ALGORITHM})
        token = jwe.JWE(
            key.export_private().encode("utf-8"),
            protected={"alg": "A256KW", "enc": "A256GCM", "kid": self._kek_id, "cty": "jwk+json"},
        )
        token.add_recipient(self._kek)
        return {
            "kid": kid,
            "state": state,
            "created_at": int(time.time()),
            "public": public,
            "private": token.serialize(compact=True),
        }

    def _decrypt(self, record: dict[str, Any]) -> jwk.JWK:
        try:
            token = jwe.JWE()
            token.deserialize(record["private"], key=self._kek)
            key = jwk.JWK.from_json(token.payload.decode("utf-8"))
        except Exception:
            raise KeyRingError(
                f"cannot decrypt signing key {record.get('kid')}: wrong key-encryption key?"
            ) from None
        return key


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value
