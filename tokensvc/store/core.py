"""What every part of the family store shares: the connection and its scripts, the
revocation feed's append, and settle() (replicas confirming a write)."""

from __future__ import annotations

import asyncio

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MovedError

from tokensvc.redis.connection import RedisClient
from tokensvc.redis.lean import Script, script_for
from tokensvc.store.calls import StoreUnavailable, guarded, script_source
from tokensvc.store.keyspace import REVOCATIONS, fence_key

# a feed event as the store appends it: (kind, value, expiry ms, watermark ms)
FeedEvent = tuple[str, str, int, int]


class StoreCore:
    """The Redis connection, the registered scripts and the feed/replication helpers.

    Every operation is one Lua script (registered once, called by SHA; reloaded on
    NOSCRIPT; through the client's lean link where it has one, :mod:`tokensvc.redis.lean`),
    so a failure half-way never leaves a family half-written. Each part of the store
    registers its scripts in :meth:`_register_scripts`.
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
        self._scripts: list[Script] = []
        self._register_scripts()

    def _register_scripts(self) -> None:
        """Register the scripts of this part of the store (each part extends it)."""

    def _register(self, name: str, *, gcra: bool = False, feed: bool = False) -> Script:
        script = script_for(self.redis, script_source(name, gcra=gcra, feed=feed))
        self._scripts.append(script)
        return script

    async def load_scripts(self) -> None:
        """Load every script once at start-up so the first calls need no NOSCRIPT retry."""
        for script in self._scripts:
            await guarded(self.redis.script_load, script.script)

    def _feed_window(self, now_ms: int) -> tuple[int, int]:
        """(stream MINID, expiry of an event made now): events older than the longest
        access-token lifetime cover only expired tokens."""
        return now_ms - self.feed_ttl_ms - 60_000, now_ms + self.feed_ttl_ms

    async def _append(self, events: list[FeedEvent], now_ms: int, *, always: bool = False) -> None:
        """Append events the scripts could not (Cluster, see FamilyStore; ``always``: events
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

    def _with_feed(self, key: str) -> tuple[str, ...]:
        """What a revocation written at ``key`` must have settled: ``key``, and on Cluster
        the revocation stream too (its event was appended there, on another primary)."""
        return (key,) if self._inline_feed else (key, REVOCATIONS)

    async def settle(self, *keys: str) -> None:
        """Make what the primaries holding ``keys`` have acknowledged survive their loss:
        with ``wait_replicas`` > 0, return only once that many replicas of each have it.

        Redis WAIT waits for the replication offset of the *connection's* last write (Redis
        7 advances it only on writes that replicate), so a WAIT on some other pooled
        connection would prove nothing. Hence one pipeline, on one connection to each
        primary: SET a short-lived fence key in the key's hash slot, then WAIT. Offsets
        only grow, so replicas that have the fence have every write the primary took
        before it: the write the caller just made, and any earlier one that had no WAIT
        of its own (e.g. a reuse detection's). On Cluster the fence and the WAIT go to the
        node the slot map names for each key (the keys' primaries are waited for at once:
        a revocation's slot and the revocation stream's); if the slot has moved the fence
        is refused (MOVED) instead of being re-sent elsewhere, away from its WAIT: the
        slot map is corrected and :func:`guarded` sends both again.

        Not covered: a failover completing between the caller's write and this fence (it
        takes the primary's down-after / node timeout, and connections to the dead primary
        fail rather than move on) would have the new primary confirm a fence without the
        write; WAIT is replication to memory, not fsync, and not consensus.

        Raises:
            StoreUnavailable: fewer replicas confirmed within ``wait_timeout``. The write
                is in force on the primary but might not survive losing it; the caller
                retries (revocations are idempotent; a retried Refresh gets the same
                successor within the grace window).
        """
        if self.wait_replicas <= 0 or not keys:
            return
        if isinstance(self.redis, RedisCluster):
            by_node: dict[str, str] = {}
            for key in keys:
                node = self.redis.get_node_from_key(key)
                by_node.setdefault(node.name if node else key, key)
            acks = await asyncio.gather(
                *(guarded(self._fence_and_wait, key) for key in by_node.values())
            )
            acked = min(acks)
        else:
            acked = await guarded(self._fence_and_wait, keys[0])
        if acked < self.wait_replicas:
            raise StoreUnavailable(
                f"only {acked} of {self.wait_replicas} replicas confirmed the write within "
                f"{self.wait_timeout} s"
            )

    async def _fence_and_wait(self, key: str) -> int:
        fence = fence_key(key)
        timeout_ms = max(1, round(self.wait_timeout * 1000))
        if isinstance(self.redis, RedisCluster):
            node = self.redis.get_node_from_key(key)
            cpipe = self.redis.pipeline(transaction=False)
            cpipe.execute_command("SET", fence, b"1", "PX", 10_000, target_nodes=node)
            cpipe.execute_command("WAIT", self.wait_replicas, timeout_ms, target_nodes=node)
            try:
                replies = await cpipe.execute(allow_redirections=False)
            except MovedError as err:  # the slot has a new home: WAIT there next time
                await self.redis.nodes_manager.move_slot(err)
                raise
        else:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(fence, b"1", px=10_000)
            pipe.execute_command("WAIT", self.wait_replicas, timeout_ms)
            replies = await pipe.execute()
        return int(replies[1])

    async def ping(self) -> bool:
        return bool(await guarded(self.redis.ping))
