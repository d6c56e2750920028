"""Rows store.refresh_nowait and store.refresh_wait: the latency cost of
``--redis-wait-replicas 1``. One family rotated sequentially through the service's own
store and scripts (one client, no gRPC), on the bench's Redis with a replica attached:
without WAIT, then with each rotation confirmed by the replica (a fence write and WAIT on
the primary's connection, one more round trip plus the replication delay). ``rps`` is
rotations per second of that loop, ``p50_ms``/``p99_ms`` the latency of one rotation."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

from bench.run import Bench
from tokensvc.families.tokens import RefreshTokens, SubjectTags, new_session_id, refresh_hash
from tokensvc.redis.connection import redis_client
from tokensvc.redis.embedded import RedisProcess
from tokensvc.store import FamilyStore, NewFamily, Presented, StoreUnavailable, Successor

ROWS = ("store.refresh_nowait", "store.refresh_wait")
CLAIMS = {"sub": "bench-wait", "aud": ["mesh"], "client_id": "bench", "roles": ["reader"]}


async def rotations(redis_url: str, count: int, wait_replicas: int) -> list[float]:
    """Rotate one new family ``count`` times; each rotation's seconds."""
    redis = redis_client(redis_url, 5.0)
    try:
        store = FamilyStore(redis, wait_replicas=wait_replicas, wait_timeout=1.0)
        codec = RefreshTokens(b"\x01" * 32)
        sid = new_session_id(SubjectTags(b"\x02" * 32).of(f"bench-wait-{wait_replicas}"))
        now, day = int(time.time() * 1000), 86_400_000
        ends = (now + day) // 1000
        token = codec.new(sid, 1, ends)
        family = NewFamily(
            sid, refresh_hash(token), "bench-wait", "bench", "", CLAIMS, now, now + day, now + day
        )
        await store.create(family)
        took = []
        for generation in range(2, count + 2):
            successor = codec.new(sid, generation, ends)
            nxt = Successor(refresh_hash(successor), generation, ends)
            start = time.perf_counter()
            rotation = await store.rotate(
                sid, Presented(refresh_hash(token), generation - 1, True), nxt, now, day
            )
            took.append(time.perf_counter() - start)
            if rotation.status.value != "ok":
                raise RuntimeError(f"rotation {generation}: {rotation.status}")
            token = successor
        return took
    finally:
        await redis.aclose()


def _row(took: list[float]) -> dict[str, float]:
    ms = sorted(t * 1000 for t in took)
    return {
        "rps": round(len(took) / sum(took), 1),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
    }


def run(b: Bench) -> None:
    count = b.n(2000)
    b.progress(f"store.refresh with and without WAIT ({count} rotations each)")
    port = int(b.redis_url.rsplit(":", 1)[1].split("/")[0])
    replica = RedisProcess(
        Path(b.data_dir) / "wait-replica",
        extra_args=("--replicaof", "127.0.0.1", str(port), "--repl-diskless-sync-delay", "0"),
    ).start()
    try:
        for attempt in range(20):  # until the replica has synced and confirms writes
            try:
                asyncio.run(rotations(b.redis_url, 10, 1))
                break
            except StoreUnavailable:
                if attempt == 19:
                    raise
        b.rows["store.refresh_nowait"] = _row(asyncio.run(rotations(b.redis_url, count, 0)))
        b.rows["store.refresh_wait"] = _row(asyncio.run(rotations(b.redis_url, count, 1)))
    finally:
        replica.stop()
    nowait, wait = b.rows["store.refresh_nowait"], b.rows["store.refresh_wait"]
    print(
        f"     store.refresh p50 {nowait['p50_ms']} ms without WAIT, {wait['p50_ms']} ms "
        f"with WAIT 1 (x{wait['p50_ms'] / max(nowait['p50_ms'], 1e-9):.1f})",
        file=sys.stderr,
    )
