"""Reading the audit trail: ``tokensvc audit tail`` prints the stream's newest entries, one
JSON object per line, and with ``--follow`` the new ones as they arrive; ``--security`` reads
the security stream, completed with the older security events of the main stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from tokensvc.observe.audit import SECURITY_EVENTS
from tokensvc.observe.audit_writer import AUDIT_STREAM, BATCH_MAX, SECURITY_STREAM
from tokensvc.proc.tasks import cancelled_since, cancelling_count
from tokensvc.redis.connection import RedisClient
from tokensvc.store import guarded, text

#: XREAD BLOCK of `tail --follow`, milliseconds (below any sane client socket timeout).
FOLLOW_BLOCK_MS: Final = 1000


def _line(entry_id: bytes | str, fields: Mapping[bytes | str, bytes | str]) -> str:
    out: dict[str, Any] = {"id": text(entry_id)}
    for key, value in fields.items():
        name, item = text(key), text(value)
        out.setdefault(name, int(item) if name == "ts" and item.isdigit() else item)
    return json.dumps(out)


async def tail(
    redis: RedisClient,
    *,
    stream: str = AUDIT_STREAM,
    count: int = 20,
    follow: bool = False,
    write: Callable[[str], None] = print,
    security: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Write the last ``count`` entries of the stream, oldest first, one JSON object per
    line (``{"id": ..., "ts": ..., "event": ..., ...}``); with ``follow``, keep writing new
    entries until cancelled or ``stop`` is set (seen within one ``XREAD`` block, 1 s).

    ``security``: only the security events (:data:`SECURITY_EVENTS`), from
    :data:`SECURITY_STREAM`, completed with the security events in ``stream`` older than
    its oldest entry -- those an earlier version wrote to ``stream`` only.

    Raises:
        tokensvc.store.StoreUnavailable: Redis is unreachable.
    """
    baseline = cancelling_count()
    if security:
        newest = await _security_newest(redis, stream, count)
        stream = SECURITY_STREAM
    else:
        newest = await guarded(redis.xrevrange, stream, count=max(count, 1))
    last = text(newest[0][0]) if newest else "0-0"
    entries: Iterable[Any] = reversed(newest[:count]) if count > 0 else ()
    for entry_id, fields in entries:
        write(_line(entry_id, fields))
    while follow and not (stop is not None and stop.is_set()):
        if cancelled_since(baseline):
            raise asyncio.CancelledError
        reply: Any = await guarded(
            redis.xread, {stream: last}, count=BATCH_MAX, block=FOLLOW_BLOCK_MS
        )
        for _name, new in reply or ():
            for entry_id, fields in new:
                write(_line(entry_id, fields))
                last = text(entry_id)


#: Entries of the old stream read at most while looking for earlier security events.
_LEGACY_SCAN_MAX: Final = 100_000


async def _security_newest(redis: RedisClient, legacy: str, count: int) -> list[Any]:
    """The newest ``count`` security entries, newest first (see :func:`tail`)."""
    want = max(count, 1)
    found: list[Any] = await guarded(redis.xrevrange, SECURITY_STREAM, count=want)
    # the security stream's copy of a record is written before the main stream's, so
    # everything in the main stream older than its oldest entry is not in it
    before = f"({text(found[-1][0])}" if found else "+"
    scanned = 0
    while len(found) < want and scanned < _LEGACY_SCAN_MAX:
        page: list[Any] = await guarded(redis.xrevrange, legacy, max=before, count=BATCH_MAX)
        if not page:
            break
        scanned += len(page)
        for entry_id, fields in page:
            if text(fields.get(b"event", fields.get("event", b""))) in SECURITY_EVENTS:
                found.append((entry_id, fields))
        before = f"({text(page[-1][0])}"
    return found[:want]
