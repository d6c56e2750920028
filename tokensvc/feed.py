"""The revocation feed: the server side of ``WatchRevocations``.

Revocations are appended to the Redis stream :data:`tokensvc.store.REVOCATIONS` by the
revoking scripts (see :class:`tokensvc.store.FamilyStore`). Each process runs one
:class:`RevocationHub`: a single ``XREAD BLOCK`` loop whose live events are fanned out to
every watcher in memory, so a thousand interceptors cost one blocked Redis connection,
not a thousand.

A watcher first catches up from the stream itself (``XRANGE``): from just after its
``resume_from`` id if the stream still holds everything after it, else a ``RESET`` event
and every entry still in force. Then it receives live events, skipping ids it has already
sent. A watcher too slow to keep up, or a hub that lost Redis, ends the stream with
UNAVAILABLE: the client reconnects and resumes from its last id, so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from tokensvc.errors import BadRequest
from tokensvc.redisconn import RedisClient
from tokensvc.store import REVOCATIONS, StoreUnavailable, guarded, text
from tokensvc.tasks import cancelled_since, cancelling_count
from tokensvc.times import ts_ms
from tokensvc_client.v1 import tokensvc_pb2 as pb

log = logging.getLogger("tokensvc.feed")
_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_KINDS: Final = {
    "token": pb.RevocationEvent.TOKEN,
    "session": pb.RevocationEvent.SESSION,
    "subject": pb.RevocationEvent.SUBJECT,
    "key": pb.RevocationEvent.KEY,
}
_QUEUE: Final = 10_000
_BATCH: Final = 1_000
_CLOSED: Final = object()


class FeedClosed(StoreUnavailable):
    """The watcher's stream must end (slow watcher, the hub lost Redis, or shutdown): the
    caller gets UNAVAILABLE and resumes from its last event id."""


def _id(value: str) -> tuple[int, int]:
    match = _ID.fullmatch(value)
    if match is None:
        raise ValueError(value)
    return int(match.group(1)), int(match.group(2))


def to_event(entry_id: Any, fields: dict[Any, Any]) -> pb.RevocationEvent | None:
    """A stream entry as an event (``None`` for an entry this version cannot read)."""
    data = {text(k): text(v) for k, v in fields.items()}
    kind = _KINDS.get(data.get("kind", ""))
    if kind is None or not data.get("exp", "0").isdigit() or not data.get("before", "0").isdigit():
        return None
    event = pb.RevocationEvent(
        id=text(entry_id),
        kind=kind,
        value=data.get("value", ""),
        expires_at=ts_ms(int(data.get("exp", "0"))),
    )
    if kind == pb.RevocationEvent.SUBJECT:
        # whole seconds, rounded down: interceptors compare it with ``iat`` (whole seconds),
        # so a login in the same second as "log out everywhere" is not refused for its whole
        # lifetime; sessions created earlier in that second come as SESSION events anyway
        event.revoked_before.CopyFrom(ts_ms(int(data.get("before", "0")) // 1000 * 1000))
    return event


class RevocationHub:
    """One Redis reader per process, fanning live revocation events out to watchers."""

    def __init__(self, redis: RedisClient, *, block_ms: int = 1000) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self._watchers: set[asyncio.Queue[object]] = set()
        self._last: str | None = None  # the id the reader continues after

    async def prime(self) -> None:
        """Fix the reader's starting point at the stream's newest entry. Called before the
        server takes calls: a watcher's catch-up then always reaches at least as far as
        the reader starts, so no event falls between the two."""
        newest = await guarded(self.redis.xrevrange, REVOCATIONS, count=1)
        self._last = text(newest[0][0]) if newest else "0-0"

    async def run(self) -> None:
        """Read live events until cancelled; on Redis trouble end every watcher's stream,
        and on cancellation (shutdown) too, so a draining server does not wait for them."""
        try:
            await self._read()
        finally:
            self._close_all()

    async def _read(self) -> None:
        if self._last is None:
            await self.prime()
        delay = 0.1
        baseline = cancelling_count()
        while not cancelled_since(baseline):  # redis-py can swallow a cancel (see audit)
            try:
                reply = await guarded(
                    self.redis.xread, {REVOCATIONS: self._last}, count=_BATCH, block=self.block_ms
                )
                events = [
                    (text(entry_id), to_event(entry_id, fields))
                    for _stream, entries in reply or ()
                    for entry_id, fields in entries
                ]
                delay = 0.1
            except Exception as err:  # StoreUnavailable, or an entry we cannot read
                # keep the position: reading on from it (even if trimmed since) loses nothing
                log.warning("revocation feed reader: %s; watchers reconnect", err)
                self._close_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for entry_id, event in events:
                self._last = entry_id
                if event is not None:
                    self._publish(event)
        raise asyncio.CancelledError

    def _publish(self, event: pb.RevocationEvent) -> None:
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # too slow: end its stream, it resumes from its id
                self._watchers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(_CLOSED)

    def _close_all(self) -> None:
        for queue in list(self._watchers):
            self._watchers.discard(queue)
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(_CLOSED)

    async def watch(self, resume_from: str) -> AsyncIterator[pb.RevocationEvent]:
        """Catch-up events, then live ones; raises :class:`FeedClosed` to end the stream.

        Raises:
            BadRequest: ``resume_from`` is not a stream id.
            StoreUnavailable: Redis is unreachable.
        """
        if resume_from:
            try:
                _id(resume_from)
            except ValueError:
                raise BadRequest("resume_from is not a revocation event id") from None
        if self._last is None:
            await self.prime()  # (the server primes before it serves; this is a safeguard)
        queue: asyncio.Queue[object] = asyncio.Queue(_QUEUE)
        self._watchers.add(queue)  # before catching up: nothing falls between the two
        try:
            sent = (0, 0)
            async for event in self._catch_up(resume_from):
                sent = _id(event.id) if event.id else sent
                yield event
            while True:
                item = await queue.get()
                if item is _CLOSED:
                    raise FeedClosed("revocation feed interrupted; resume from the last id")
                assert isinstance(item, pb.RevocationEvent)
                if _id(item.id) > sent:
                    sent = _id(item.id)
                    yield item
        finally:
            self._watchers.discard(queue)

    async def _catch_up(self, resume_from: str) -> AsyncIterator[pb.RevocationEvent]:
        oldest = await guarded(self.redis.xrange, REVOCATIONS, count=1)
        held = bool(resume_from) and bool(oldest) and _id(text(oldest[0][0])) <= _id(resume_from)
        if held:
            cursor = f"({resume_from}"
        else:
            yield pb.RevocationEvent(kind=pb.RevocationEvent.RESET)
            cursor = "-"
        now_ms = int(time.time() * 1000)
        while True:
            entries = await guarded(self.redis.xrange, REVOCATIONS, cursor, "+", count=_BATCH)
            for entry_id, fields in entries:
                event = to_event(entry_id, fields)
                # a snapshot leaves out what no longer matters; a resume sends everything
                if event is not None and (held or event.expires_at.ToMilliseconds() > now_ms):
                    yield event
            if len(entries) < _BATCH:
                return
            cursor = f"({text(entries[-1][0])}"


__all__ = ["FeedClosed", "RevocationHub", "StoreUnavailable", "to_event"]
