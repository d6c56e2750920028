"""The key ring's lifecycle operations (docs/design.md, Keys): the scheduled transitions
(:meth:`RingRotation.tick`), rotation, emergency rotation, abandoning a pending key, and
re-wrapping under a new KEK -- each one Lua script on Redis's clock (``keys.lua``), so
replicas agree on when a transition is due and exactly one performs it.

:class:`Lifecycle` holds the durations; :class:`RingRotation` is a base of
:class:`tokensvc.keys.ring.KeyRing`, on top of the state and reads of
:class:`tokensvc.keys.ring_state.RingState`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from redis.commands.core import AsyncScript

from tokensvc.keys.backend import LOCAL, SigningUnavailable, backend_of
from tokensvc.keys.local import jwe_kid
from tokensvc.keys.ring_state import (
    ACTIVE_KEY,
    DESTROY_KEY,
    RING_KEY,
    SECRETS_KEY,
    VERSION_KEY,
    RingState,
)
from tokensvc.store import guarded, text

log = logging.getLogger("tokensvc.keyring")

_REPLACE_IF_UNCHANGED: Final = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """Durations of the key lifecycle, ms (the states: :mod:`tokensvc.keys.ring`)."""

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


class RingRotation(RingState):
    """The lifecycle operations of the ring (see the module doc)."""

    @functools.cached_property
    def _lifecycle(self) -> AsyncScript:
        """The lifecycle script (registered on first use: no Redis call)."""
        return self._redis.register_script(
            resources.files("tokensvc.keys").joinpath("keys.lua").read_text()
        )

    @functools.cached_property
    def _replace(self) -> AsyncScript:
        return self._redis.register_script(_REPLACE_IF_UNCHANGED)

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
            if jwe_kid(text(stored)) != self._kek_id:
                value = self._wrap_secret(self._unwrap_secret(text(name), text(stored)))
                await guarded(self._replace, keys=[SECRETS_KEY], args=[name, stored, value])
        raw = await guarded(self._redis.hgetall, RING_KEY)
        args: list[str] = []
        for kid, stored in raw.items():
            record = json.loads(stored)
            if backend_of(record) != LOCAL or jwe_kid(record["private"]) == self._kek_id:
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
            if jwe_kid(self.records.get(kid, {}).get("private", "")) == self._kek_id
        )
