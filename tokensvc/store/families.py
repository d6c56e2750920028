"""Refresh families: creating one (Issue), rotating it (Refresh), reading its state
(Introspect) and listing a subject's sessions.

**Families v2: constant size, exact reuse detection.** A family hash holds the current
token's hash (``cur``) and generation (``gen``), times, the claims, and at most one grace
record (``g``): nothing per rotation. Reuse detection must still recognise *every* token
the family issued and rotated, and nothing else. It does so by construction of the token
(:mod:`tokensvc.families.tokens`): generation ``n`` carries ``HMAC(K, sid, n, random)`` under the
deployment secret ``K``. The argument:

- *Every rotated token is recognised.* A presented token whose MAC verifies and whose
  generation is at most ``gen`` but is not ``cur`` was issued by the service for this
  session (the MAC binds the session id and generation) and has been superseded: reuse.
  Generations only grow (a rotation writes ``gen + 1``; a script refuses any other, see
  ``regen``), so "older generation" is exactly "rotated".
- *Nothing else is.* Without ``K`` nobody makes a valid MAC (HMAC is a PRF; 128-bit tags):
  a guessed token, one forged from a session id seen in a log, or one of another family
  (other session id in the MAC) is ``unknown`` and revokes nothing -- the service refuses
  it before any Redis trip. A token of a *later* generation than ``gen`` (a rotation lost
  in a failover) is ``unknown`` too.
- *Nothing usable is stored.* Redis holds the SHA-256 of the current token, MACs are not
  stored at all, and ``K`` is stored only encrypted under the KEK. Someone who steals
  ``K`` can forge *old* generations -- i.e. revoke sessions whose ids they know -- but not
  the current token, whose 256 random bits are checked against ``cur``.
- *v1 families* (before v2) keep their ``u:<hash>`` fields, the old evidence; their current
  v1 token rotates into generation 1 and is itself recorded as used once. They stop
  growing; new families never have such fields.

**Grace window.** A rotation with the window on also stores ``g`` = its time, 128 bits of
the presented token's hash and the successor's random part sealed under a key derived from
the presented token (:meth:`tokensvc.families.tokens.RefreshTokens.seal`). Re-presenting that token
within the window, while ``last`` still equals that time (no later rotation happened),
returns the sealed successor (``replayed``): the same one, whoever asks how often. Anyone
else meets reuse or ``unknown`` as in strict mode.

Refresh and the refresh-token Introspect are one script each, one round trip.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from dataclasses import dataclass
from typing import Any

from tokensvc.families.tokens import tag_of
from tokensvc.redis.lean import Script
from tokensvc.store.calls import guarded, text
from tokensvc.store.core import StoreCore
from tokensvc.store.keyspace import (
    RING_VERSION,
    family_key,
    issue_limit_key,
    jti_key,
    sessions_key,
    subject_key,
)
from tokensvc.store.ratelimits import NO_LIMIT, Limit

log = logging.getLogger("tokensvc.store")


class RefreshStatus(enum.Enum):
    OK = "ok"
    REPLAYED = "replayed"  # grace window: the same successor again
    REGEN = "regen"  # the successor must be of another generation: mint it again
    REUSE = "reuse"
    REVOKED = "revoked"
    EXPIRED = "expired"
    UNKNOWN = "unknown"
    MISMATCH = "mismatch"  # bound family, other (or no) client certificate


class IssueStatus(enum.Enum):
    OK = "ok"
    LOCKED = "locked"
    LIMITED = "limited"


@dataclass(frozen=True, slots=True)
class IssueOutcome:
    status: IssueStatus
    retry_after_ms: int = 0
    created_ms: int = 0  # Redis's clock: the access token's iat


@dataclass(frozen=True, slots=True)
class NewFamily:
    session_id: str
    token_hash: str
    subject: str
    client_id: str
    label: str
    claims: dict[str, Any]
    now_ms: int
    token_expires_ms: int
    family_expires_ms: int
    cnf: str = ""  # x5t#S256 the family is bound to, '' if unbound


@dataclass(frozen=True, slots=True)
class Presented:
    """A presented refresh token as the scripts see it: its hash, its generation (0: a v1
    token) and whether its MAC proved the service issued it."""

    token_hash: str
    generation: int = 0
    genuine: bool = False


@dataclass(frozen=True, slots=True)
class Successor:
    """The token a rotation makes current: hash, generation, the family end it carries
    (UNIX s), and (grace window on) the sealed random part a replay hands back (``b""`` in
    strict mode)."""

    token_hash: str
    generation: int
    ends_at: int
    sealed: bytes = b""


@dataclass(frozen=True, slots=True)
class Rotation:
    status: RefreshStatus
    subject: str = ""
    client_id: str = ""
    claims: dict[str, Any] | None = None
    family_expires_ms: int = 0
    token_expires_ms: int = 0
    now_ms: int = 0  # Redis's clock: the access token's iat
    generation: int = 0  # REPLAYED: the successor's; REGEN: the family's current one
    sealed: bytes = b""  # REPLAYED: the sealed successor


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One row of a subject's session listing (times in ms)."""

    session_id: str
    client_id: str
    label: str
    created_ms: int
    last_ms: int
    expires_ms: int
    active: bool


@dataclass(frozen=True, slots=True)
class AccessState:
    """What Redis says about an access token's session, and the key ring's version read
    in the same round trip (-1: not read)."""

    active: bool
    reason: str = ""
    ring_version: int = -1


_ACCESS_FIELDS = ("state", "created", "exp")
_FAMILY_FIELDS = (
    "state",
    "cur",
    "cur_exp",
    "exp",
    "created",
    "last",
    "label",
    "claims",
)


class FamilyOps(StoreCore):
    """Issue, Refresh, Introspect and ListSessions on refresh families."""

    _issue: Script
    _refresh: Script
    _read_state: Script
    _ring_version: Script

    def _register_scripts(self) -> None:
        super()._register_scripts()
        self._issue = self._register("issue.lua", gcra=True)
        self._refresh = self._register("refresh.lua", feed=True)
        self._read_state = self._register("state.lua")
        self._ring_version = self._register("ring_version.lua")

    #: some subject is locked under its legacy tag (see RevocationOps.find_legacy_locks)
    legacy_locks = False

    async def create(
        self, family: NewFamily, limit: Limit = NO_LIMIT, legacy_tag: str = ""
    ) -> IssueOutcome:
        """Store a new family unless the subject is locked (also under ``legacy_tag``,
        when an older version left locks) or over its Issue limit."""
        legacy = subject_key(legacy_tag)
        if self.legacy_locks and legacy_tag and await guarded(self.redis.hexists, legacy, "locked"):
            return IssueOutcome(IssueStatus.LOCKED)
        tag = tag_of(family.session_id)
        reply = await guarded(
            self._issue,
            keys=[
                family_key(family.session_id),
                sessions_key(tag),
                subject_key(tag),
                issue_limit_key(tag),
            ],
            args=[
                family.session_id,
                family.token_hash,
                family.now_ms,
                family.token_expires_ms,
                family.family_expires_ms,
                family.subject,
                family.client_id,
                family.label,
                json.dumps(family.claims, separators=(",", ":")),
                family.cnf,
                limit.interval_us,
                limit.tolerance_us,
            ],
        )
        status = IssueStatus(text(reply[0]))
        if status is IssueStatus.OK:
            await self.settle(family_key(family.session_id))  # --redis-wait-replicas
            return IssueOutcome(status, created_ms=int(reply[1]))
        return IssueOutcome(status, int(reply[1]) if status is IssueStatus.LIMITED else 0)

    async def rotate(
        self,
        sid: str,
        presented: Presented,
        successor: Successor,
        now_ms: int,
        idle_ttl_ms: int,
        thumbprint: str = "",
        grace_ms: int = 0,
    ) -> Rotation:
        """Rotate a refresh token (``lua/refresh.lua``); ``thumbprint`` is the presenter's
        client certificate, ``grace_ms`` the grace window (0: strict). The rotation runs
        on Redis's clock; ``now_ms`` (the service's) only places its feed event."""
        minid, exp = self._feed_window(now_ms)
        reply = await guarded(
            self._refresh,
            keys=[family_key(sid), subject_key(tag_of(sid)), *self._stream()],
            args=[
                presented.token_hash,
                presented.generation,
                int(presented.genuine),
                successor.token_hash,
                successor.generation,
                successor.sealed,
                idle_ttl_ms,
                thumbprint,
                grace_ms,
                minid,
                exp,
                sid,
                successor.ends_at,
            ],
        )
        status = RefreshStatus(text(reply[0]))
        if status in (RefreshStatus.OK, RefreshStatus.REPLAYED):
            # --redis-wait-replicas: the rotation (or, replayed, the one it repeats) must be
            # on the replicas before the successor is handed out, else UNAVAILABLE. The
            # client's retry with the same token is then safe within the grace window (the
            # same successor again, confirmed this time); without one it is reuse, hence
            # the start-up warning (tokensvc.runtime.startup)
            await self.settle(family_key(sid))
            claims = json.loads(reply[1])
            return Rotation(
                status,
                subject=str(claims.get("sub", "")),
                client_id=str(claims.get("client_id", "")),
                claims=claims,
                family_expires_ms=int(reply[2]),
                token_expires_ms=int(reply[3]),
                now_ms=int(reply[4]),
                sealed=bytes(reply[5]) if status is RefreshStatus.REPLAYED else b"",
                generation=int(reply[6]) if status is RefreshStatus.REPLAYED else 0,
            )
        if status is RefreshStatus.REGEN:
            return Rotation(status, generation=int(reply[1]), family_expires_ms=int(reply[2]))
        if status in (RefreshStatus.REUSE, RefreshStatus.REVOKED):
            # (Cluster) a revoked family is announced again: a retry after a lost append
            await self._append([("session", sid, exp, 0)], now_ms)
        if status is RefreshStatus.REUSE:
            # a revocation and its event: a retry sees 'revoked' (and announces it again)
            await self.settle(*self._with_feed(family_key(sid)))
            return Rotation(status, subject=str(json.loads(reply[1]).get("sub", "")))
        return Rotation(status)

    async def _state(
        self, sid: str, jti: str | None, fields: tuple[str, ...], *, ring: bool = False
    ) -> tuple[dict[str, str], int | None, bool, int]:
        """Family fields, subject watermark, jti revocation and (``ring``: not on Cluster)
        the key ring's version (else -1): one read-only script."""
        fam = family_key(sid)
        keys = [fam, subject_key(tag_of(sid)), jti_key(sid, jti) if jti else fam]
        if ring:
            keys.append(RING_VERSION)
        reply = await guarded(self._read_state, keys=keys, args=list(fields))
        n = len(fields)
        values = {k: text(v) for k, v in zip(fields, reply, strict=False) if v is not None}
        watermark = int(reply[n]) if reply[n] else None
        return values, watermark, bool(reply[n + 1]), int(reply[n + 2])

    async def refresh_state(self, sid: str, token_hash: str, now_ms: int) -> dict[str, str] | None:
        """The family of a refresh token if that token is its current, usable one."""
        fields, watermark, _, _ = await self._state(sid, None, _FAMILY_FIELDS)
        if fields.get("cur") != token_hash or fields.get("state") != "active":
            return None
        if now_ms >= int(fields["cur_exp"]) or now_ms >= int(fields["exp"]):
            return None
        if watermark is not None and int(fields["created"]) <= watermark:
            return None
        return fields

    async def access_state(self, sid: str, jti: str, now_ms: int) -> AccessState:
        """Revocation state of an access token's jti, its family and its subject, with the
        key ring's version (an emergency key revocation elsewhere counts at once).

        The version is read in the same script where the ring shares the server (single
        Redis, Sentinel); on Cluster it lives on another primary and is read alongside,
        concurrently (one more command, no more waiting), by a script of its own so that it
        too takes the lean path (:mod:`tokensvc.redis.lean_cluster`)."""
        if self._inline_feed:
            state = await self._state(sid, jti, _ACCESS_FIELDS, ring=True)
            ring_version = state[3]
        else:
            state, version = await asyncio.gather(
                self._state(sid, jti, _ACCESS_FIELDS),
                guarded(self._ring_version, keys=[RING_VERSION]),
            )
            ring_version = int(version)
        fields, watermark, jti_revoked, _ = state
        if "state" not in fields:
            return AccessState(False, "unknown_session", ring_version)
        if fields["state"] != "active" or now_ms >= int(fields["exp"]):
            return AccessState(False, "session_revoked", ring_version)
        if jti_revoked:
            return AccessState(False, "token_revoked", ring_version)
        if watermark is not None and int(fields["created"]) <= watermark:
            return AccessState(False, "subject_revoked", ring_version)
        return AccessState(True, "", ring_version)

    async def list_sessions(
        self, tags: tuple[str, ...], now_ms: int, limit: int = 500
    ) -> list[SessionInfo]:
        """The subject's sessions under each of its ``tags`` (keyed, legacy), newest
        ``limit`` first."""
        found = [s for tag in tags for s in await self._list_tag(tag, now_ms, limit)]
        return sorted(found, key=lambda s: s.created_ms, reverse=True)[:limit]

    async def _list_tag(self, tag: str, now_ms: int, limit: int) -> list[SessionInfo]:
        """The sessions of one tag (newest ``limit``), pruning expired ones from its index."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(sessions_key(tag), "-inf", now_ms)
        pipe.zrange(sessions_key(tag), -limit, -1)
        pipe.hget(subject_key(tag), "revoked_before")
        _, sids, watermark = await guarded(pipe.execute)
        if not sids:
            return []
        fields = ("state", "created", "last", "exp", "cur_exp", "claims", "label")
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hmget(family_key(text(sid)), fields)
        rows = await guarded(pipe.execute)
        wm = int(watermark) if watermark else 0
        out = []
        for sid, row in zip(sids, rows, strict=True):
            f = dict(zip(fields, (text(v) if v is not None else "" for v in row), strict=True))
            if not f["state"]:
                continue  # the family expired between the two reads
            active = (
                f["state"] == "active"
                and now_ms < int(f["cur_exp"])
                and now_ms < int(f["exp"])
                and int(f["created"]) > wm
            )
            out.append(
                SessionInfo(
                    text(sid),
                    str(json.loads(f["claims"] or "{}").get("client_id", "")),
                    f["label"],
                    int(f["created"]),
                    int(f["last"]),
                    int(f["exp"]),
                    active,
                )
            )
        return out
