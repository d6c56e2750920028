"""Row store.family_bytes: Redis ``MEMORY USAGE`` of one refresh family after 10 000
rotations through the service's own store and scripts, grace window on (families v2 keep
it constant; v1 grew by one field per rotation: 229 KB after 2 000). Its ``rps`` is
rotations per second of that sequential loop (one client, no gRPC)."""

from __future__ import annotations

import asyncio
import sys
import time

from bench.run import Bench, Target
from tokensvc.families.tokens import RefreshTokens, SubjectTags, new_session_id, refresh_hash
from tokensvc.redis.connection import redis_client
from tokensvc.store import FamilyStore, NewFamily, Presented, Successor, family_key

ROWS = ("store.family_bytes",)
TARGETS = [Target("store.family_bytes", "", "bytes", at_most=1024)]
CLAIMS = {"sub": "bench-user", "aud": ["mesh"], "client_id": "bench", "roles": ["reader"]}


async def family_bytes(redis_url: str, rotations: int, grace_ms: int = 30_000) -> int:
    """Start a family, rotate it ``rotations`` times (grace window on: the largest state),
    return its MEMORY USAGE in bytes."""
    redis = redis_client(redis_url, 5.0)
    try:
        store, codec = FamilyStore(redis), RefreshTokens(b"\x01" * 32)
        sid = new_session_id(SubjectTags(b"\x02" * 32).of("bench-user"))
        now, day = int(time.time() * 1000), 86_400_000
        token = codec.new(sid, 1, (now + day) // 1000)
        family = NewFamily(
            sid, refresh_hash(token), "bench-user", "bench", "", CLAIMS, now, now + day, now + day
        )
        await store.create(family)
        for generation in range(2, rotations + 2):
            successor = codec.new(sid, generation, (now + day) // 1000)
            rotation = await store.rotate(
                sid,
                Presented(refresh_hash(token), generation - 1, True),
                Successor(
                    refresh_hash(successor),
                    generation,
                    (now + day) // 1000,
                    codec.seal(token, successor),
                ),
                now,
                day,
                grace_ms=grace_ms,
            )
            if rotation.status.value != "ok":
                raise RuntimeError(f"rotation {generation}: {rotation.status}")
            token = successor
        usage = await redis.memory_usage(family_key(sid), samples=0)
        return int(usage or 0)
    finally:
        await redis.aclose()


def run(b: Bench) -> None:
    rotations = 10_000  # also in --quick: the row is about the 10 000th rotation
    b.progress(f"store.family_bytes ({rotations} rotations)")
    start = time.perf_counter()
    size = asyncio.run(family_bytes(b.redis_url, rotations))
    rps = round(rotations / (time.perf_counter() - start), 1)
    b.rows["store.family_bytes"] = {"bytes": size, "rotations": rotations, "rps": rps}
    print(f"     store.family_bytes = {size} B after {rotations} rotations", file=sys.stderr)
