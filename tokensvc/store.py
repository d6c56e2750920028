"""The family store: refresh families and revocations in Redis.

Key layout (``T`` = the subject's 128-bit tag, see :mod:`tokensvc.tokens`; the braces are
the Redis Cluster hash tag, so all keys of one subject share one slot)::

    ts:{T}:fam:<sid>   hash   one refresh family: state, current token hash (cur), its
                              expiry, creation, absolute expiry, subject, client_id, label,
                              claims JSON, and one ``u:<hash>`` field per rotated token
    ts:{T}:sessions    zset   the subject's session ids, scored by absolute expiry
    ts:{T}:subject     hash   revoked_before (ms watermark)
    ts:{T}:jti:<jti>   string a revoked access token, expiring with the token
    ts:{T}:rl:issue    string GCRA state of the subject's Issue rate limit
    ts:rl:<what>:<h>   string GCRA state of a per-peer limit (h: hash of the peer identity)

The subject hash also holds ``locked`` while the subject is locked (LockSubject).

Every operation is one Lua script (registered once, called by SHA; redis-py reloads it on
NOSCRIPT), so a failure half-way never leaves a family half-written. Only hashes of
refresh tokens are stored. Automatic client retries are off: re-sending a Refresh whose
reply was lost would present a spent token and revoke the family.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokensvc.tokens import tag_of


class StoreUnavailable(RuntimeError):
    """Redis is unreachable or timed out; nothing was (or can be known to be) written."""


async def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Await a Redis call; connection trouble becomes :class:`StoreUnavailable`."""
    try:
        return await fn(*args, **kwargs)
    except (RedisConnectionError, RedisTimeoutError, OSError) as err:
        raise StoreUnavailable(f"redis unavailable: {type(err).__name__}") from err
    except RedisError as err:
        if any(word in str(err) for word in ("LOADING", "MASTERDOWN", "READONLY")):
            raise StoreUnavailable(f"redis not ready: {type(err).__name__}") from err
        raise


def _script(name: str, *, gcra: bool = False) -> str:
    """A Lua script's source; ``gcra`` prepends the rate-limiting function."""
    lua = resources.files("tokensvc").joinpath("lua")
    prelude = lua.joinpath("gcra.lua").read_text() if gcra else ""
    return prelude + lua.joinpath(name).read_text()


def family_key(sid: str) -> str:
    return f"ts:{{{tag_of(sid)}}}:fam:{sid}"


def sessions_key(tag: str) -> str:
    return f"ts:{{{tag}}}:sessions"


def subject_key(tag: str) -> str:
    return f"ts:{{{tag}}}:subject"


def jti_key(sid: str, jti: str) -> str:
    return f"ts:{{{tag_of(sid)}}}:jti:{jti}"


def issue_limit_key(tag: str) -> str:
    return f"ts:{{{tag}}}:rl:issue"


def peer_limit_key(what: str, peer: str) -> str:
    digest = hashlib.sha256(peer.encode("utf-8")).hexdigest()[:32]
    return f"ts:rl:{what}:{digest}"


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit in the scripts' terms: GCRA emission interval and burst tolerance, ms."""

    interval_ms: int = 0
    tolerance_ms: int = 0

    @classmethod
    def of(cls, count: int, period_s: int) -> Limit:
        if count <= 0:
            return cls()
        return cls(max(1, period_s * 1000 // count), period_s * 1000)

    @property
    def enabled(self) -> bool:
        return self.interval_ms > 0


class RefreshStatus(enum.Enum):
    OK = "ok"
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
class Rotation:
    status: RefreshStatus
    subject: str = ""
    client_id: str = ""
    claims: dict[str, Any] | None = None
    family_expires_ms: int = 0
    token_expires_ms: int = 0


@dataclass(frozen=True, slots=True)
class AccessState:
    """What Redis says about an access token's session."""

    active: bool
    reason: str = ""


_FAMILY_FIELDS = (
    "state",
    "cur",
    "cur_exp",
    "exp",
    "created",
    "last",
    "sub",
    "cid",
    "label",
    "claims",
)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class FamilyStore:
    """Refresh families and revocation state, each operation one Redis round trip."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._issue = redis.register_script(_script("issue.lua", gcra=True))
        self._rate = redis.register_script(_script("ratelimit.lua", gcra=True))
        self._unlock = redis.register_script(_script("unlock.lua"))
        self._refresh = redis.register_script(_script("refresh.lua"))
        self._revoke_family = redis.register_script(_script("revoke_family.lua"))
        self._revoke_subject = redis.register_script(_script("revoke_subject.lua"))
        self._read_state = redis.register_script(_script("state.lua"))

    async def load_scripts(self) -> None:
        """Load every script once at start-up so the first calls need no NOSCRIPT retry."""
        scripts = (
            self._issue,
            self._refresh,
            self._revoke_family,
            self._revoke_subject,
            self._read_state,
            self._rate,
            self._unlock,
        )
        for script in scripts:
            await guarded(self.redis.script_load, script.script)

    async def create(self, family: NewFamily, limit: Limit = Limit()) -> IssueOutcome:
        """Store a new family unless the subject is locked or over its Issue limit."""
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
                limit.interval_ms,
                limit.tolerance_ms,
            ],
        )
        status = IssueStatus(_s(reply[0]))
        return IssueOutcome(status, int(reply[1]) if status is IssueStatus.LIMITED else 0)

    async def rotate(
        self,
        sid: str,
        presented_hash: str,
        successor_hash: str,
        now_ms: int,
        idle_ttl_ms: int,
        thumbprint: str = "",
    ) -> Rotation:
        """Rotate a refresh token; ``thumbprint`` is the presenter's client certificate."""
        reply = await guarded(
            self._refresh,
            keys=[family_key(sid), subject_key(tag_of(sid))],
            args=[presented_hash, successor_hash, now_ms, idle_ttl_ms, thumbprint],
        )
        status = RefreshStatus(_s(reply[0]))
        if status is RefreshStatus.OK:
            return Rotation(
                status,
                subject=_s(reply[2]),
                client_id=_s(reply[3]),
                claims=json.loads(reply[1]),
                family_expires_ms=int(reply[4]),
                token_expires_ms=int(reply[5]),
            )
        if status is RefreshStatus.REUSE:
            return Rotation(status, subject=_s(reply[1]))
        return Rotation(status)

    async def _state(
        self, sid: str, jti: str | None, fields: tuple[str, ...]
    ) -> tuple[dict[str, str], int | None, bool]:
        """Family fields, subject watermark and jti revocation: one read-only script."""
        fam = family_key(sid)
        reply = await guarded(
            self._read_state,
            keys=[fam, subject_key(tag_of(sid)), jti_key(sid, jti) if jti else fam],
            args=list(fields),
        )
        values = {n: _s(v) for n, v in zip(fields, reply, strict=False) if v is not None}
        watermark = reply[len(fields)]
        return values, (int(watermark) if watermark else None), bool(reply[len(fields) + 1])

    async def refresh_state(self, sid: str, token_hash: str, now_ms: int) -> dict[str, str] | None:
        """The family of a refresh token if that token is its current, usable one."""
        fields, watermark, _ = await self._state(sid, None, _FAMILY_FIELDS)
        if fields.get("cur") != token_hash or fields.get("state") != "active":
            return None
        if now_ms >= int(fields["cur_exp"]) or now_ms >= int(fields["exp"]):
            return None
        if watermark is not None and int(fields["created"]) <= watermark:
            return None
        return fields

    async def access_state(self, sid: str, jti: str, now_ms: int) -> AccessState:
        """Revocation state of an access token's jti, its family and its subject."""
        fields, watermark, jti_revoked = await self._state(sid, jti, ("state", "created", "exp"))
        if "state" not in fields:
            return AccessState(False, "unknown_session")
        if fields["state"] != "active" or now_ms >= int(fields["exp"]):
            return AccessState(False, "session_revoked")
        if jti_revoked:
            return AccessState(False, "token_revoked")
        if watermark is not None and int(fields["created"]) <= watermark:
            return AccessState(False, "subject_revoked")
        return AccessState(True)

    async def revoke_jti(self, sid: str, jti: str, expires_at_s: int) -> None:
        await guarded(self.redis.set, jti_key(sid, jti), b"1", exat=expires_at_s)

    async def revoke_sessions(
        self, sids: list[str], now_ms: int, reason: str, token_hash: str | None = None
    ) -> int:
        args: list[Any] = [now_ms, reason] + ([token_hash] if token_hash else [])
        return int(
            await guarded(self._revoke_family, keys=[family_key(s) for s in sids], args=args)
        )

    async def revoke_subject(
        self, tag: str, now_ms: int, reason: str, watermark_ttl_ms: int, *, lock: bool = False
    ) -> int:
        """Revoke every session of a subject (and lock it); returns sessions revoked."""
        sids = await guarded(self.redis.zrangebyscore, sessions_key(tag), now_ms, "+inf")
        keys = [subject_key(tag), sessions_key(tag)] + [family_key(_s(s)) for s in sids]
        args = [now_ms, reason, watermark_ttl_ms, "1" if lock else "0"]
        return int(await guarded(self._revoke_subject, keys=keys, args=args))

    async def unlock_subject(self, tag: str, watermark_ttl_ms: int) -> bool:
        """Let Issue serve the subject again; True if it was locked."""
        reply = await guarded(self._unlock, keys=[subject_key(tag)], args=[watermark_ttl_ms])
        return bool(int(reply))

    async def hit(self, key: str, limit: Limit) -> int:
        """Count one event against a limiter; 0 if allowed, else ms to wait."""
        if not limit.enabled:
            return 0
        return int(
            await guarded(self._rate, keys=[key], args=[limit.interval_ms, limit.tolerance_ms])
        )

    async def ping(self) -> bool:
        return bool(await guarded(self.redis.ping))
