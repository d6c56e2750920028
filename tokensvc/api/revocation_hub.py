"""The revocation feed: the server side of ``WatchRevocations``.

Revocations are appended to the Redis stream :data:`tokensvc.store.REVOCATIONS` by the
revoking scripts (see :class:`tokensvc.store.FamilyStore`). Each process runs one
:class:`RevocationHub`: it reads the whole stream once when it is primed, then follows it
with a single ``XREAD BLOCK`` loop, and keeps every event still in force in memory. Live
events are fanned out to every watcher in memory, so a thousand interceptors cost one
blocked Redis connection, not a thousand -- and a new watcher's catch-up comes from that
memory too, never from a Redis scan of its own (sixty watchers connecting over 30 000
revocations would otherwise scan the stream sixty times).

A watcher gets, from just after its ``resume_from`` id, what the hub holds if the hub has
held everything since (its oldest entry is not newer than that id) and the feed has reached
that id, else (an unknown position: too old, or ahead of the feed) a ``RESET`` event and
every entry still in force; then live events, skipping ids it has already sent. The
catch-up is a copy taken in the same step as the watcher's registration, so no event falls
between the two. A watcher too slow to keep up, or a hub that lost Redis, ends the stream
with UNAVAILABLE; while the reader is failing no new stream is accepted (the client keeps
counting its feed as down), and once it reads again it continues from its last id, so
nothing is lost. Streams per client are capped (:class:`TooManyWatchers`), and so is the
rate of full catch-ups per client (:class:`TooManyFullCatchUps`): a stream that starts
without a resumable position costs a copy of every revocation in force (~1.4 s of CPU at
30 000), a resumed one only what it missed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from redis.exceptions import ResponseError

from tokensvc.api.times import ts_ms
from tokensvc.errors import BadRequest, RateLimited
from tokensvc.proc.tasks import cancelled_since, cancelling_count
from tokensvc.redis.connection import RedisClient
from tokensvc.store import REVOCATIONS, StoreUnavailable, guarded, revocations_in_force, text
from tokensvc_client.v1 import tokensvc_pb2 as pb

log = logging.getLogger("tokensvc.feed")
_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_U64 = 1 << 64
_KINDS: Final = {
    "token": pb.RevocationEvent.TOKEN,
    "session": pb.RevocationEvent.SESSION,
    "subject": pb.RevocationEvent.SUBJECT,
    "key": pb.RevocationEvent.KEY,
}
_QUEUE: Final = 10_000
_BATCH: Final = 1_000
_CLOSED: Final = object()
_PRUNE_MS: Final = 5_000
#: how often an idle reader checks that the stream still holds its position, seconds
_VERIFY_S: Final = 5.0

#: Full catch-ups (streams starting with RESET) one client may start in a burst, and the
#: seconds in which it earns one more (``--rate-full-catch-ups``, default 16/64).
FULL_CATCH_UP_BURST: Final = 16
FULL_CATCH_UP_EVERY: Final = 4.0
_BUCKETS_KEPT: Final = 10_000


class FeedClosed(StoreUnavailable):
    """The watcher's stream must end (slow watcher, the hub lost Redis, or shutdown): the
    caller gets UNAVAILABLE and resumes from its last event id."""


def _id(value: str) -> tuple[int, int]:
    """A Redis stream id ``MS-SEQ`` as a pair; both parts are unsigned 64-bit numbers,
    so anything larger is not an id (Redis would refuse it with an error)."""
    match = _ID.fullmatch(value)
    if match is None:
        raise ValueError(value)
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms >= _U64 or seq >= _U64:
        raise ValueError(value)
    return ms, seq


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
        # to the millisecond: interceptors refuse every ``iat`` (whole seconds) before it, so
        # a family created earlier in the watermark's second is covered even when it has no
        # SESSION event (missing from the subject's session index); a family created later
        # in that second is dated from the next one (issue.lua), so a login right after "log
        # out everywhere" is not refused
        event.revoked_before.CopyFrom(ts_ms(int(data.get("before", "0"))))
    return event


class TooManyWatchers(RateLimited):
    """A client already holds as many WatchRevocations streams as it may (RESOURCE_EXHAUSTED)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} WatchRevocations streams per client", 1000)


class TooManyFullCatchUps(RateLimited):
    """A client starts streams without a resumable position faster than it may
    (RESOURCE_EXHAUSTED, retry-after when the next one is allowed)."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(
            "too many WatchRevocations streams without a resumable position: "
            "resume from the last event id",
            retry_after_ms,
        )


class RevocationHub:
    """One Redis reader per process: the events in force in memory, fanned out to watchers.

    Args:
        redis: the Redis client.
        block_ms: how long one ``XREAD`` blocks.
        max_per_client: concurrent streams one client (see :meth:`watch`) may hold.
        full_catch_ups: streams without a resumable position one client may start: a burst,
            then one more every so many seconds (``None``: no limit).
        feed_ttl_ms: how long an event matters (longest access-token lifetime + leeway).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        block_ms: int = 1000,
        max_per_client: int = 16,
        feed_ttl_ms: int = 930_000,
        full_catch_ups: tuple[int, float] | None = (FULL_CATCH_UP_BURST, FULL_CATCH_UP_EVERY),
    ):
        self.redis = redis
        self.feed_ttl_ms = feed_ttl_ms  # how long a revocation rebuilt by resync() lasts
        self.resyncs = 0  # times the stream lost history and the hub rebuilt (a metric)
        self.block_ms = block_ms
        self.max_per_client = max_per_client
        #: (burst, seconds to earn one more) of full catch-ups per client; None: no limit
        self.full_catch_ups = full_catch_ups
        self._watchers: set[asyncio.Queue[object]] = set()
        self._clients: dict[str, int] = {}
        #: per client: full catch-ups it may start now, and when that was computed
        self._full: dict[str, tuple[float, float]] = {}
        self._last: str | None = None  # the id the reader continues after
        #: the events read, in stream order, as (id, expiry ms, event); expired ones pruned
        self._held: list[tuple[tuple[int, int], int, pb.RevocationEvent]] = []
        self._ids: list[tuple[int, int]] = []  # the ids of _held, for bisection
        #: the oldest id held: from there on the hub has read every entry (None: none yet)
        self._floor: tuple[int, int] | None = None
        self._pruned_at = 0.0
        self._reading = True  # False while the reader fails: new watchers are refused
        self.sent = 0  # live events put to watchers' queues (a metric)

    @property
    def watcher_count(self) -> int:
        """Open WatchRevocations streams (a metric)."""
        return len(self._watchers)

    async def prime(self) -> None:
        """Read the stream as it is now and fix the reader's starting point after its
        newest entry. Called before the server takes calls (the one full read of the
        stream per process)."""
        cursor, last = "-", "0-0"
        while True:
            entries = await guarded(self.redis.xrange, REVOCATIONS, cursor, "+", count=_BATCH)
            for entry_id, fields in entries:
                last = text(entry_id)
                self._hold(last, to_event(entry_id, fields))
            if len(entries) < _BATCH:
                break
            cursor = f"({last}"
        if self._last is None:
            self._last = last

    def _hold(self, entry_id: str, event: pb.RevocationEvent | None) -> None:
        key = _id(entry_id)
        if self._floor is None:
            self._floor = key
        if event is not None and (not self._ids or key > self._ids[-1]):
            self._held.append((key, event.expires_at.ToMilliseconds(), event))
            self._ids.append(key)

    def _prune(self, now_ms: int) -> None:
        """Forget events no longer in force (at most every few seconds)."""
        if now_ms - self._pruned_at < _PRUNE_MS:
            return
        self._pruned_at = now_ms
        self._held = [item for item in self._held if item[1] > now_ms]
        self._ids = [item[0] for item in self._held]

    @property
    def held(self) -> int:
        """Events held in memory."""
        return len(self._held)

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
        verify_at = time.monotonic() + _VERIFY_S
        while not cancelled_since(baseline):  # redis-py can swallow a cancel (see audit)
            try:
                if not self._reading or time.monotonic() >= verify_at:
                    verify_at = time.monotonic() + _VERIFY_S
                    if await self._history_lost():
                        await self.resync()
                reply = await guarded(
                    self.redis.xread, {REVOCATIONS: self._last}, count=_BATCH, block=self.block_ms
                )
                events = [
                    (text(entry_id), to_event(entry_id, fields))
                    for _stream, entries in reply or ()
                    for entry_id, fields in entries
                ]
                delay = 0.1
                self._reading = True
            except Exception as err:  # StoreUnavailable, or an entry we cannot read
                # keep the position: reading on from it (even if trimmed since) loses nothing
                log.warning("revocation feed reader: %s; watchers reconnect", err)
                self._reading = False
                self._close_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            for entry_id, event in events:
                self._last = entry_id
                self._hold(entry_id, event)
                if event is not None:
                    self._publish(event)
            self._prune(int(time.time() * 1000))
        raise asyncio.CancelledError

    async def _history_lost(self) -> bool:
        """Whether the stream no longer holds the reader's position: its last id went
        backwards, or the entry at the position is gone though the stream was not trimmed
        past it (a failover to a replica that lacked entries, a restored Redis). Checked
        after every failure and every few seconds: entries the new primary appends after
        the position would otherwise hide the gap."""
        last = self._last
        if last is None or last == "0-0":
            return False
        position = _id(last)
        try:
            info = await guarded(self.redis.xinfo_stream, REVOCATIONS)
        except ResponseError as err:  # "no such key": the stream itself is gone
            if "no such key" in str(err).lower():
                return True
            raise
        if _id(text(info["last-generated-id"])) < position:
            return True
        if await guarded(self.redis.xrange, REVOCATIONS, last, last):
            return False
        first = info.get("first-entry")
        # trimmed past the position (by age: those events are expired) is not lost history
        return first is not None and _id(text(first[0])) < position

    async def resync(self) -> None:
        """Rebuild after lost history: re-read the stream, add every revocation still in
        force from where it is stored (:func:`tokensvc.store.revocations_in_force`, not
        only the stream, whose lost entries are gone for good), and end every watcher's
        stream. Their resume ids are older than the new floor, so each reconnects to a
        ``RESET`` and the full set; until the rebuild is done new watchers are refused."""
        self.resyncs += 1
        log.error(
            "revocation feed: the stream lost history after id %s (failover to a replica "
            "that lacked entries, or a restored Redis); rebuilding from the revocation "
            "state and resetting every watcher",
            self._last,
        )
        self._reading = False
        self._close_all()
        before = _id(self._last) if self._last else (0, 0)
        self._held, self._ids, self._floor, self._last = [], [], None, None
        await self.prime()
        now_ms = int(time.time() * 1000)
        rebuilt = await revocations_in_force(self.redis, now_ms, self.feed_ttl_ms)
        state = [(kind, value, exp) for kind, value, exp, _before in rebuilt if kind in _KINDS]
        synthetic = [
            ((0, 0), exp, pb.RevocationEvent(kind=_KINDS[kind], value=value, expires_at=ts_ms(exp)))
            for kind, value, exp in state
        ]
        self._held = synthetic + self._held
        self._ids = [key for key, _exp, _event in self._held]
        # every id handed out before now (from the old history, or the re-read one) is
        # below the floor: a watcher resuming from it gets RESET and the full set
        newest = max(before, _id(self._last or "0-0"))
        self._floor = (newest[0], newest[1] + 1)
        log.warning(
            "revocation feed rebuilt: %d revocations from the stored state, %d stream events",
            len(synthetic),
            len(self._held) - len(synthetic),
        )

    def _publish(self, event: pb.RevocationEvent) -> None:
        self.sent += len(self._watchers)
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

    def _resumable(self, resume_from: str) -> bool:
        """Whether a watcher at ``resume_from`` can continue from it: the hub holds every
        entry since (its oldest is not newer), and the feed has issued that id (it is not
        beyond the last entry read: a position ahead of the feed is as unknown as one too
        old, and answered the same way, not waited on in silence)."""
        if not resume_from or self._floor is None or self._last is None:
            return False
        try:
            return self._floor <= _id(resume_from) <= _id(self._last)
        except ValueError:  # not an id: refused by watch
            return False

    def _full_catch_ups(self, client: str) -> float:
        """Full catch-ups ``client`` may start now (a token bucket, refilled over time)."""
        if self.full_catch_ups is None:
            return float("inf")
        burst, every = self.full_catch_ups
        tokens, stamp = self._full.get(client, (burst, 0.0))
        earned = (time.monotonic() - stamp) / every if stamp else 0.0
        return min(float(burst), tokens + earned)

    def _spend_full_catch_up(self, client: str) -> None:
        if len(self._full) >= _BUCKETS_KEPT:  # forget the clients whose bucket is full
            burst = self.full_catch_ups[0] if self.full_catch_ups else 0
            for key in [k for k in self._full if self._full_catch_ups(k) >= burst]:
                del self._full[key]
        self._full[client] = (self._full_catch_ups(client) - 1, time.monotonic())

    def _catch_up(self, resume_from: str) -> list[pb.RevocationEvent]:
        """What a new watcher is sent before live events (see the module doc)."""
        now_ms = int(time.time() * 1000)
        if self._resumable(resume_from):
            start = bisect.bisect_right(self._ids, _id(resume_from))
            return [event for _key, exp, event in self._held[start:] if exp > now_ms]
        reset = pb.RevocationEvent(kind=pb.RevocationEvent.RESET)
        return [reset, *(event for _key, exp, event in self._held if exp > now_ms)]

    def check(self, client: str, resume_from: str = "") -> None:
        """Raise what :meth:`watch` would refuse a new stream of ``client`` from
        ``resume_from`` with now.

        Raises:
            TooManyWatchers: ``client`` holds ``max_per_client`` streams already.
            TooManyFullCatchUps: the stream would be a full catch-up (no resumable
                position) and ``client`` has started too many of those lately.
            FeedClosed: the reader is failing (Redis unreachable).
        """
        if self._clients.get(client, 0) >= self.max_per_client:
            raise TooManyWatchers(self.max_per_client)
        if not self._resumable(resume_from) and self._full_catch_ups(client) < 1:
            every = self.full_catch_ups[1] if self.full_catch_ups else 0.0
            wait = (1 - self._full_catch_ups(client)) * every
            raise TooManyFullCatchUps(int(wait * 1000) + 1)
        if not self._reading:
            raise FeedClosed("revocation feed reader is reconnecting to Redis; retry")

    async def watch(self, resume_from: str, client: str = "") -> AsyncIterator[pb.RevocationEvent]:
        """Catch-up events, then live ones; raises :class:`FeedClosed` to end the stream.

        Args:
            resume_from: the last event id the watcher has, or "".
            client: whom the stream counts against (at most ``max_per_client`` at once).

        Raises:
            BadRequest: ``resume_from`` is not a stream id.
            TooManyWatchers, TooManyFullCatchUps, FeedClosed: see :meth:`check`.
            StoreUnavailable: Redis is unreachable.
        """
        if resume_from:
            try:
                _id(resume_from)
            except ValueError:
                raise BadRequest("resume_from is not a revocation event id") from None
        if self._last is None:
            await self.prime()  # (the server primes before it serves; this is a safeguard)
        self.check(client, resume_from)  # from here on no await until it is registered
        self._clients[client] = self._clients.get(client, 0) + 1
        if not self._resumable(resume_from):
            self._spend_full_catch_up(client)
        queue: asyncio.Queue[object] = asyncio.Queue(_QUEUE)
        # taken in one step with the registration: no event falls between the two
        self._watchers.add(queue)
        # after a RESET the watcher starts over: live events count from the catch-up, not
        # from a position it was told is unknown
        sent = _id(resume_from) if self._resumable(resume_from) else (0, 0)
        catch_up = self._catch_up(resume_from)
        try:
            for event in catch_up:
                if event.id:
                    sent = max(sent, _id(event.id))
                yield event
            del catch_up
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
            left = self._clients.get(client, 1) - 1
            if left > 0:
                self._clients[client] = left
            else:
                self._clients.pop(client, None)


__all__ = [
    "FeedClosed",
    "RevocationHub",
    "StoreUnavailable",
    "TooManyFullCatchUps",
    "TooManyWatchers",
    "to_event",
]
