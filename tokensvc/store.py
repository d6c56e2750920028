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
    ts:{T}:fence       string short-lived write that Redis WAIT confirms (see settle())
    ts:rl:<what>:<h>   string GCRA state of a per-peer limit (h: hash of the peer identity)
    ts:revocations     stream the revocation feed (tokensvc.feed): one entry per revoked
                              jti, session, subject watermark, key; trimmed by age

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
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokensvc.redisconn import RedisClient
from tokensvc.tokens import subject_tag, tag_of

log = logging.getLogger("tokensvc.store")


class StoreUnavailable(RuntimeError):
    """Redis is unreachable or timed out; nothing was (or can be known to be) written."""


# replies of a server that cannot take the command now, also when they come wrapped in a
# script error (Redis 6 reports "ERR Error running script ... -READONLY ...")
_NOT_READY = ("LOADING", "MASTERDOWN", "READONLY", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN")
# RedisCluster's own errors when no startup node answers or the slots are not all served
_CLUSTER_UNREACHABLE = ("Redis Cluster cannot be connected", "All slots are not covered")


async def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Await a Redis call; connection trouble and failovers become :class:`StoreUnavailable`.

    Unavailable means the command did not run, or may have run but its reply was lost; the
    caller may retry. That is: connection errors and timeouts (including Sentinel's
    MasterNotFoundError, no primary known, and a server still loading its data), a primary
    without its replicas (MASTERDOWN, NOREPLICAS), a demoted primary (READONLY), and on
    Redis Cluster CLUSTERDOWN, TRYAGAIN, a slot being moved (MOVED/ASK reaching us from a
    pipeline that must not follow them), a slot map that does not cover the key, or no
    node reachable. Any other error (a bug, e.g. keys of two slots) is raised as is.
    """
    try:
        return await fn(*args, **kwargs)
    except (RedisConnectionError, RedisTimeoutError, OSError) as err:
        raise StoreUnavailable(f"redis unavailable: {type(err).__name__}") from err
    except (ClusterError, TryAgainError, AskError, ReadOnlyError, SlotNotCoveredError) as err:
        # ClusterError: CLUSTERDOWN, MASTERDOWN, redirections exhausted; AskError: also MOVED
        raise StoreUnavailable(f"redis not ready: {type(err).__name__}") from err
    except RedisClusterException as err:
        if str(err).startswith(_CLUSTER_UNREACHABLE):
            raise StoreUnavailable("redis cluster unreachable") from err
        raise
    except RedisError as err:
        if any(word in str(err) for word in _NOT_READY):
            raise StoreUnavailable(f"redis not ready: {type(err).__name__}") from err
        raise


def _script(name: str, *, gcra: bool = False, feed: bool = False) -> str:
    """A Lua script's source; ``gcra`` prepends the rate-limiting function, ``feed`` the
    revocation feed's ``emit``."""
    lua = resources.files("tokensvc").joinpath("lua")
    prelude = "".join(
        lua.joinpath(f"{lib}.lua").read_text()
        for lib, wanted in (("gcra", gcra), ("feed", feed))
        if wanted
    )
    return prelude + lua.joinpath(name).read_text()


def family_key(sid: str) -> str:
    return f"ts:{{{tag_of(sid)}}}:fam:{sid}"


def sessions_key(tag: str) -> str:
    return f"ts:{{{tag}}}:sessions"


def subject_key(tag: str) -> str:
    return f"ts:{{{tag}}}:subject"


def jti_key(sid: str, jti: str) -> str:
    return f"ts:{{{tag_of(sid)}}}:jti:{jti}"


REVOCATIONS: Final = "ts:revocations"


def issue_limit_key(tag: str) -> str:
    return f"ts:{{{tag}}}:rl:issue"


def peer_limit_key(what: str, peer: str) -> str:
    digest = hashlib.sha256(peer.encode("utf-8")).hexdigest()[:32]
    return f"ts:rl:{what}:{digest}"


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit in the scripts' terms: GCRA emission interval and burst tolerance, µs."""

    interval_us: int = 0
    tolerance_us: int = 0

    @classmethod
    def of(cls, count: int, period_s: int) -> Limit:
        if count <= 0:
            return cls()
        return cls(max(1, period_s * 1_000_000 // count), period_s * 1_000_000)

    @property
    def enabled(self) -> bool:
        return self.interval_us > 0


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


def text(value: Any) -> str:
    """A Redis reply value as text (``None``: the empty string)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class FamilyStore:
    """Refresh families and revocation state, each operation one Redis round trip.

    Every revocation is also appended to the revocation stream (:data:`REVOCATIONS`):
    inside the revoking script on a single Redis or Sentinel group (atomic with the
    revocation), right after it on Redis Cluster, where the stream is in another slot (a
    crash between the two then loses the event, not the revocation: Refresh and Introspect
    still enforce it; interceptors learn of it when the token expires). ``feed_ttl_ms``:
    how long an event matters (longest access-token lifetime + leeway).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        feed_ttl_ms: int = 930_000,
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
    ) -> None:
        self.redis = redis
        self.wait_replicas = wait_replicas  # see settle()
        self.wait_timeout = wait_timeout
        self.feed_ttl_ms = feed_ttl_ms
        self._inline_feed = not isinstance(redis, RedisCluster)
        self._issue = redis.register_script(_script("issue.lua", gcra=True))
        self._rate = redis.register_script(_script("ratelimit.lua", gcra=True))
        self._unlock = redis.register_script(_script("unlock.lua"))
        self._refresh = redis.register_script(_script("refresh.lua", feed=True))
        self._revoke_family = redis.register_script(_script("revoke_family.lua", feed=True))
        self._revoke_subject = redis.register_script(_script("revoke_subject.lua", feed=True))
        self._revoke_jti = redis.register_script(_script("revoke_jti.lua", feed=True))
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
            self._revoke_jti,
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
                limit.interval_us,
                limit.tolerance_us,
            ],
        )
        status = IssueStatus(text(reply[0]))
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
        minid, exp = self._feed_window(now_ms)
        keys = [family_key(sid), subject_key(tag_of(sid))]
        reply = await guarded(
            self._refresh,
            keys=keys + ([REVOCATIONS] if self._inline_feed else []),
            args=[presented_hash, successor_hash, now_ms, idle_ttl_ms, thumbprint, minid, exp, sid],
        )
        status = RefreshStatus(text(reply[0]))
        if status is RefreshStatus.OK:
            # best effort: raising now would make the client retry with the spent token,
            # and that retry would be reuse; an unconfirmed rotation lost in a failover
            # leaves the old token current, which only this client held
            try:
                await self.settle(family_key(sid))
            except StoreUnavailable as err:
                log.warning("refresh sid=%s not confirmed by replicas: %s", sid, err)
            return Rotation(
                status,
                subject=text(reply[2]),
                client_id=text(reply[3]),
                claims=json.loads(reply[1]),
                family_expires_ms=int(reply[4]),
                token_expires_ms=int(reply[5]),
            )
        if status in (RefreshStatus.REUSE, RefreshStatus.REVOKED):
            # (Cluster) a revoked family is announced again: a retry after a lost append
            await self._append([("session", sid, exp, 0)], now_ms)
        if status is RefreshStatus.REUSE:
            await self.settle(family_key(sid))  # a revocation: a retry sees 'revoked'
            return Rotation(status, subject=text(reply[1]))
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
        values = {n: text(v) for n, v in zip(fields, reply, strict=False) if v is not None}
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

    def _feed_window(self, now_ms: int) -> tuple[int, int]:
        """(stream MINID, expiry of an event made now): events older than the longest
        access-token lifetime cover only expired tokens."""
        return now_ms - self.feed_ttl_ms - 60_000, now_ms + self.feed_ttl_ms

    async def _append(
        self, events: list[tuple[str, str, int, int]], now_ms: int, *, always: bool = False
    ) -> None:
        """Append events the scripts could not (Cluster, see the class doc; ``always``: events
        no script knew of)."""
        if (self._inline_feed and not always) or not events:
            return
        minid, _ = self._feed_window(now_ms)
        pipe = self.redis.pipeline(transaction=False)
        for kind, value, exp, before in events:
            fields = {"kind": kind, "value": value, "exp": exp, "before": before}
            pipe.xadd(REVOCATIONS, fields, minid=minid, approximate=True)  # type: ignore[arg-type]
        await guarded(pipe.execute)

    def _stream(self) -> list[str]:
        return [REVOCATIONS] if self._inline_feed else []

    async def settle(self, key: str) -> None:
        """Make what the primary holding ``key`` has acknowledged survive its loss: with
        ``wait_replicas`` > 0, return only once that many of its replicas have it.

        Redis WAIT waits for the replication offset of the *connection's* last write (Redis
        7 advances it only on writes that replicate), so a WAIT on some other pooled
        connection would prove nothing. Hence one pipeline, on one connection to that
        primary: SET a short-lived fence key in ``key``'s hash slot, then WAIT. Offsets
        only grow, so replicas that have the fence have every write the primary took
        before it: the revocation the caller just made, and any earlier one that had no
        WAIT of its own (e.g. a reuse detection's). On Cluster the fence and the WAIT go
        to the node the slot map names for ``key``; if the slot has moved the fence is
        refused (MOVED) instead of being re-sent elsewhere, away from its WAIT.

        Not covered: a failover completing between the caller's write and this fence (it
        takes the primary's down-after / node timeout, and connections to the dead primary
        fail rather than move on) would have the new primary confirm a fence without the
        write; WAIT is replication to memory, not fsync, and not consensus.

        Raises:
            StoreUnavailable: fewer replicas confirmed within ``wait_timeout``. The write
                is in force on the primary but might not survive losing it; the caller
                retries (every revocation is idempotent).
        """
        if self.wait_replicas <= 0:
            return
        acked = await guarded(self._fence_and_wait, key)
        if acked < self.wait_replicas:
            raise StoreUnavailable(
                f"only {acked} of {self.wait_replicas} replicas confirmed the write within "
                f"{self.wait_timeout} s"
            )

    async def _fence_and_wait(self, key: str) -> int:
        tag_start = key.find("{")
        tag_end = key.find("}", tag_start + 1)
        tag = key[tag_start + 1 : tag_end] if tag_start != -1 and tag_end > tag_start + 1 else key
        fence = f"ts:{{{tag}}}:fence"  # same hash slot as key: on the same primary
        timeout_ms = max(1, round(self.wait_timeout * 1000))
        if isinstance(self.redis, RedisCluster):
            node = self.redis.get_node_from_key(key)
            cpipe = self.redis.pipeline(transaction=False)
            cpipe.execute_command("SET", fence, b"1", "PX", 10_000, target_nodes=node)
            cpipe.execute_command("WAIT", self.wait_replicas, timeout_ms, target_nodes=node)
            replies = await cpipe.execute(allow_redirections=False)
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(fence, b"1", px=10_000)
            pipe.execute_command("WAIT", self.wait_replicas, timeout_ms)
            replies = await pipe.execute()
        return int(replies[1])

    async def revoke_jti(self, sid: str, jti: str, expires_at_s: int, now_ms: int) -> None:
        minid, _ = self._feed_window(now_ms)
        await guarded(
            self._revoke_jti,
            keys=[jti_key(sid, jti), *self._stream()],
            args=[expires_at_s, int(self._inline_feed), minid, jti],
        )
        await self._append([("token", jti, expires_at_s * 1000, 0)], now_ms)
        await self.settle(jti_key(sid, jti))

    async def revoke_sessions(
        self, sids: list[str], now_ms: int, reason: str, token_hash: str | None = None
    ) -> int:
        """Revoke families (only the one owning ``token_hash``, if given); returns how many
        were active."""
        minid, exp = self._feed_window(now_ms)
        args: list[Any] = [now_ms, reason, token_hash or "", int(self._inline_feed), minid, exp]
        keys = self._stream() + [family_key(s) for s in sids]
        now_revoked, revoked_before = await guarded(self._revoke_family, keys=keys, args=args)
        revoked = [text(sid) for sid in now_revoked]
        # (Cluster) also re-announce families revoked before: a retry after a lost append
        announce = revoked + [text(sid) for sid in revoked_before]
        await self._append([("session", sid, exp, 0) for sid in announce], now_ms)
        if sids:
            await self.settle(family_key(sids[0]))
        return len(revoked)

    async def revoke_subject(
        self,
        subject: str,
        now_ms: int,
        reason: str,
        watermark_ttl_ms: int,
        *,
        lock: bool = False,
    ) -> int:
        """Revoke every session of a subject (and lock it); returns sessions revoked."""
        tag = subject_tag(subject)
        sids = await guarded(self.redis.zrangebyscore, sessions_key(tag), now_ms, "+inf")
        minid, exp = self._feed_window(now_ms)
        keys = [subject_key(tag), sessions_key(tag)] + [family_key(text(s)) for s in sids]
        args = [now_ms, reason, watermark_ttl_ms, int(lock), int(self._inline_feed), minid, exp]
        reply = await guarded(
            self._revoke_subject, keys=keys + self._stream(), args=[*args, subject]
        )
        watermark, revoked = int(reply[0]), [text(sid) for sid in reply[1:]]
        events = [("session", sid, exp, 0) for sid in revoked]
        await self._append([*events, ("subject", subject, exp, watermark)], now_ms)
        await self._announce_late_families(tag, {text(s) for s in sids}, watermark, now_ms)
        await self.settle(subject_key(tag))
        return len(revoked)

    async def _announce_late_families(
        self, tag: str, listed: set[str], watermark: int, now_ms: int
    ) -> None:
        """Families created between reading the index and the watermark are revoked by it
        (Refresh and Introspect compare creation times) but got no SESSION event, and the
        feed's SUBJECT event is in whole seconds: interceptors would let their tokens
        through. Announce them."""
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

    async def list_sessions(self, tag: str, now_ms: int, limit: int = 500) -> list[SessionInfo]:
        """The subject's sessions (newest ``limit``), pruning expired ones from its index."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(sessions_key(tag), "-inf", now_ms)
        pipe.zrange(sessions_key(tag), -limit, -1)
        pipe.hget(subject_key(tag), "revoked_before")
        _, sids, watermark = await guarded(pipe.execute)
        if not sids:
            return []
        fields = ("state", "created", "last", "exp", "cur_exp", "cid", "label")
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
                    f["cid"],
                    f["label"],
                    int(f["created"]),
                    int(f["last"]),
                    int(f["exp"]),
                    active,
                )
            )
        return sorted(out, key=lambda s: s.created_ms, reverse=True)

    async def revoke_keys(self, kids: list[str], now_ms: int) -> None:
        """Announce signing keys removed from the JWK Set (emergency rotation)."""
        minid, exp = self._feed_window(now_ms)
        pipe = self.redis.pipeline(transaction=False)
        for kid in kids:
            fields = {"kind": "key", "value": kid, "exp": exp, "before": 0}
            pipe.xadd(REVOCATIONS, fields, minid=minid, approximate=True)  # type: ignore[arg-type]
        await guarded(pipe.execute)

    async def unlock_subject(self, tag: str, watermark_ttl_ms: int) -> bool:
        """Let Issue serve the subject again; True if it was locked."""
        reply = await guarded(self._unlock, keys=[subject_key(tag)], args=[watermark_ttl_ms])
        return bool(int(reply))

    async def hit(self, key: str, limit: Limit) -> int:
        """Count one event against a limiter; 0 if allowed, else ms to wait."""
        if not limit.enabled:
            return 0
        return int(
            await guarded(self._rate, keys=[key], args=[limit.interval_us, limit.tolerance_us])
        )

    async def ping(self) -> bool:
        return bool(await guarded(self.redis.ping))
