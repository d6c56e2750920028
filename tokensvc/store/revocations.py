"""Revocations: of access tokens (jti), sessions, subjects (watermark and lock) and
signing keys, each written to Redis and announced on the revocation feed."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from tokensvc.redis.connection import RedisClient
from tokensvc.redis.lean import Script
from tokensvc.store.calls import guarded, text
from tokensvc.store.core import FeedEvent, StoreCore
from tokensvc.store.keyspace import (
    LEGACY_LOCKS,
    REVOCATIONS,
    family_key,
    jti_key,
    sessions_key,
    subject_key,
)


class RevocationOps(StoreCore):
    """Revoke, RevokeSubject, LockSubject/UnlockSubject and emergency key revocation."""

    _revoke_family: Script
    _revoke_subject: Script
    _revoke_jti: Script
    _unlock: Script

    def _register_scripts(self) -> None:
        super()._register_scripts()
        self._revoke_family = self._register("revoke_family.lua", feed=True)
        self._revoke_subject = self._register("revoke_subject.lua", feed=True)
        self._revoke_jti = self._register("revoke_jti.lua", feed=True)
        self._unlock = self._register("unlock.lua")

    async def revoke_jti(self, sid: str, jti: str, expires_at_s: int, now_ms: int) -> None:
        minid, _ = self._feed_window(now_ms)
        await guarded(
            self._revoke_jti,
            keys=[jti_key(sid, jti), *self._stream()],
            args=[expires_at_s, int(self._inline_feed), minid, jti],
        )
        await self._append([("token", jti, expires_at_s * 1000, 0)], now_ms)
        await self.settle(*self._with_feed(jti_key(sid, jti)))

    async def revoke_sessions(
        self,
        sids: list[str],
        now_ms: int,
        reason: str,
        token_hash: str | None = None,
        generation: int = 0,
    ) -> int:
        """Revoke families (only the one owning ``token_hash``, if given: ``generation`` is
        that token's if its MAC is valid, else 0); returns how many were active."""
        minid, exp = self._feed_window(now_ms)
        args: list[Any] = [now_ms, reason, token_hash or "", int(self._inline_feed), minid, exp]
        args.append(generation)
        keys = self._stream() + [family_key(s) for s in sids]
        now_revoked, revoked_before = await guarded(self._revoke_family, keys=keys, args=args)
        revoked = [text(sid) for sid in now_revoked]
        # (Cluster) also re-announce families revoked before: a retry after a lost append
        announce = revoked + [text(sid) for sid in revoked_before]
        await self._append([("session", sid, exp, 0) for sid in announce], now_ms)
        if sids:
            await self.settle(*self._with_feed(family_key(sids[0])))
        return len(revoked)

    async def revoke_subject(
        self,
        tag: str,
        legacy_tag: str,
        now_ms: int,
        reason: str,
        watermark_ttl_ms: int,
        *,
        lock: bool = False,
    ) -> int:
        """Revoke every session of a subject (and lock it), under its tag and its legacy
        tag (sessions from before keyed tags; skipped when none is left); returns sessions
        revoked. Only the keyed tag is announced as a SUBJECT event; legacy sessions as
        SESSION events."""
        count = await self._revoke_tag(legacy_tag, now_ms, reason, watermark_ttl_ms, lock, False)
        return count + await self._revoke_tag(tag, now_ms, reason, watermark_ttl_ms, lock, True)

    async def _revoke_tag(
        self, tag: str, now_ms: int, reason: str, ttl_ms: int, lock: bool, announce: bool
    ) -> int:
        sids = await guarded(self.redis.zrangebyscore, sessions_key(tag), now_ms, "+inf")
        if not sids and not announce:
            return 0  # no session left under the legacy tag: nothing to write there
        minid, exp = self._feed_window(now_ms)
        keys = [subject_key(tag), sessions_key(tag)] + [family_key(text(s)) for s in sids]
        args = [now_ms, reason, ttl_ms, int(lock), int(self._inline_feed), minid, exp]
        reply = await guarded(
            self._revoke_subject, keys=keys + self._stream(), args=[*args, tag, int(announce)]
        )
        watermark, revoked = int(reply[0]), [text(sid) for sid in reply[1:]]
        events = [("session", sid, exp, 0) for sid in revoked]
        if announce:
            events.append(("subject", tag, exp, watermark))
        await self._append(events, now_ms)
        await self._announce_late_families(tag, {text(s) for s in sids}, watermark, now_ms)
        await self.settle(*self._with_feed(subject_key(tag)))
        return len(revoked)

    async def _announce_late_families(
        self, tag: str, listed: set[str], watermark: int, now_ms: int
    ) -> None:
        """Families created between reading the index and the watermark are revoked by it
        (Refresh and Introspect compare creation times) but got no SESSION event. The
        feed's SUBJECT event (to the millisecond) covers them already; announcing them
        too makes session-level feeds exact."""
        index = await guarded(self.redis.zrangebyscore, sessions_key(tag), now_ms, "+inf")
        missed = [sid for sid in map(text, index) if sid not in listed]
        if not missed:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sid in missed:
            pipe.hget(family_key(sid), "created")
        created = await guarded(pipe.execute)
        _, exp = self._feed_window(now_ms)
        late = [sid for sid, c in zip(missed, created, strict=True) if c and int(c) <= watermark]
        await self._append([("session", sid, exp, 0) for sid in late], now_ms, always=True)

    async def revoke_keys(self, kids: list[str], now_ms: int) -> None:
        """Announce signing keys removed from the JWK Set (emergency rotation)."""
        minid, exp = self._feed_window(now_ms)
        pipe = self.redis.pipeline(transaction=False)
        for kid in kids:
            fields = {"kind": "key", "value": kid, "exp": exp, "before": 0}
            pipe.xadd(REVOCATIONS, fields, minid=minid, approximate=True)  # type: ignore[arg-type]
        await guarded(pipe.execute)
        await self.settle(REVOCATIONS)

    async def unlock_subject(self, tag: str, legacy_tag: str, watermark_ttl_ms: int) -> bool:
        """Let Issue serve the subject again (under both its tags); True if it was locked."""
        was_locked = False
        for key in (subject_key(tag), subject_key(legacy_tag)):
            reply = await guarded(self._unlock, keys=[key], args=[watermark_ttl_ms])
            was_locked = bool(int(reply)) or was_locked
        return was_locked

    async def find_legacy_locks(self) -> bool:
        """Whether some subject is locked under its legacy tag by an older version (a lock
        without the ``k`` mark): then Issue also checks the legacy tag (one more round
        trip). Scans the subject hashes once; the answer "none" is remembered in Redis
        (this version never writes such a lock), so later starts skip the scan."""
        if text(await guarded(self.redis.get, LEGACY_LOCKS)) == "0":
            return False
        found, batch = False, []
        async for key in self.redis.scan_iter(match="ts:{*}:subject", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                found = await self._any_legacy_lock(batch)
                batch = []
                if found:
                    break
        found = found or await self._any_legacy_lock(batch)
        await guarded(self.redis.set, LEGACY_LOCKS, "1" if found else "0")
        return found

    async def _any_legacy_lock(self, keys: list[Any]) -> bool:
        if not keys:
            return False
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, ["locked", "k"])
        rows = await guarded(pipe.execute)
        return any(locked is not None and mark is None for locked, mark in rows)


_TAGGED = re.compile(r"ts:\{([^}]*)\}:(fam|jti|subject)(?::(.+))?")
_SCAN_BATCH = 500


async def revocations_in_force(
    redis: RedisClient, now_ms: int, feed_ttl_ms: int
) -> list[FeedEvent]:
    """Every revocation still in force, read from where it is stored rather than from the
    feed: for a feed reader whose stream lost history (a failover to a replica that lacked
    entries, a restored Redis), see :class:`tokensvc.api.revocation_hub.RevocationHub`.

    Revoked access tokens (``jti`` keys, expiring with their token), revoked families
    (``state`` revoked: an event lasting ``feed_ttl_ms`` from ``revoked_at``) and families
    a subject watermark revoked (created at or before it; announced as SESSION events, one
    per family, since the watermark's own key does not tell a keyed tag from a legacy one,
    which the feed must not carry). Scans every primary once; rare, and as costly as the
    number of families.
    """
    events: list[FeedEvent] = []
    watermarks: dict[str, int] = {}
    families: list[tuple[str, str, str, str, str]] = []  # (tag, sid, state, revoked_at, created)
    async for keys in _scan(redis, "ts:{*}:*"):
        parsed = [(key, _TAGGED.fullmatch(key)) for key in keys]
        wanted = [
            (key, m)
            for key, m in parsed
            if m is not None and (m.group(3) or m.group(2) == "subject")
        ]
        if not wanted:
            continue
        pipe = redis.pipeline(transaction=False)
        for key, match in wanted:
            kind = match.group(2)
            if kind == "jti":
                pipe.pttl(key)
            elif kind == "fam":
                pipe.hmget(key, ["state", "revoked_at", "created"])
            else:
                pipe.hget(key, "revoked_before")
        replies = await guarded(pipe.execute)
        for (_key, match), reply in zip(wanted, replies, strict=True):
            tag, kind, rest = match.group(1), match.group(2), match.group(3) or ""
            if kind == "jti" and int(reply) > 0:
                events.append(("token", rest, now_ms + int(reply), 0))
            elif kind == "fam" and reply[0] is not None:
                state, revoked_at, created = (text(v) for v in reply)
                families.append((tag, rest, state, revoked_at, created))
            elif kind == "subject" and reply:
                watermarks[tag] = int(reply)
    for tag, sid, state, revoked_at, created in families:
        revoked = int(revoked_at) if state == "revoked" and revoked_at.isdigit() else None
        watermark = watermarks.get(tag)
        if watermark is not None and created.isdigit() and int(created) <= watermark:
            revoked = watermark if revoked is None else max(revoked, watermark)
        if state == "revoked" and revoked is None:
            revoked = now_ms  # revoked, time unknown
        if revoked is not None and revoked + feed_ttl_ms > now_ms:
            events.append(("session", sid, revoked + feed_ttl_ms, 0))
    return events


async def _scan(redis: RedisClient, match: str) -> AsyncIterator[list[str]]:
    """Keys matching ``match`` on every primary, in batches."""
    batch: list[str] = []
    async for key in redis.scan_iter(match=match, count=1000):
        batch.append(text(key))
        if len(batch) >= _SCAN_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
