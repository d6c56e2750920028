"""The audit trail's batching writer: a bounded queue of records, written to the capped
Redis Streams by one background task.

:class:`AuditWriter` is the base of :class:`tokensvc.observe.audit.AuditTrail` (which builds
the records and logs them). Records wait in a queue of at most ``queue_max``; when it is full
the oldest is dropped and counted, with a warning at most every :data:`WARN_INTERVAL`.
:meth:`AuditWriter.run` writes them in batches -- one call of the ``audit_append`` script
(``XADD <stream> MAXLEN ~ <maxlen> * field value ...`` per record) per batch of up to
:data:`BATCH_MAX`, at most every :data:`BATCH_INTERVAL` unless a whole batch waits --
security records first to their own stream. A failed write is retried with backoff
(0.1 s doubling to 5 s), a batch whose reply was lost is written again (at least once), and
on cancellation what is queued gets one last try of up to :data:`FINAL_FLUSH_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Final, TypedDict

from tokensvc.proc.tasks import cancelled_since, cancelling_count
from tokensvc.redis.connection import RedisClient
from tokensvc.redis.lean import script_for
from tokensvc.store import guarded
from tokensvc.store.calls import script_source

AUDIT_STREAM: Final = "ts:audit"
#: The security events again, in a stream of their own that only they trim (the noise of
#: refused calls cannot evict them): see :data:`tokensvc.observe.audit.SECURITY_EVENTS`.
SECURITY_STREAM: Final = "ts:audit:security"

log = logging.getLogger("tokensvc.audit")

#: Records waiting for Redis; beyond this the oldest are dropped.
QUEUE_MAX: Final = 10_000
#: Most records written by one call; a batch is written as soon as this many wait.
BATCH_MAX: Final = 256
#: Least time between two batches while records trickle in, seconds.
BATCH_INTERVAL: Final = 0.05
#: Retry delays after a failed write: first, then doubled up to the cap, seconds.
BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 5.0
#: At most one "dropped" / "cannot write" warning per this many seconds.
WARN_INTERVAL: Final = 10.0
#: How long run() tries to write what is queued once cancelled, seconds.
FINAL_FLUSH_TIMEOUT: Final = 3.0
#: Marks a queued security record not yet written to the security stream (never stored).
SECURITY_PENDING: Final = "\0security"


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a shielded write's exception as seen (its caller may have been cancelled)."""
    if not task.cancelled():
        task.exception()


class WriterOptions(TypedDict, total=False):
    """The keyword arguments of :class:`AuditWriter` (see there)."""

    stream: str
    security_stream: str
    maxlen: int
    security_maxlen: int
    queue_max: int


class AuditWriter:
    """Queues records and writes them to the streams in batches (see the module doc).

    Run :meth:`run` as a task for the life of the server, and cancel and await that task
    before closing the Redis client: on cancellation it writes what is still queued (for
    up to 3 s).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        stream: str = AUDIT_STREAM,
        security_stream: str = SECURITY_STREAM,
        maxlen: int = 100_000,
        security_maxlen: int = 100_000,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        if maxlen < 1 or security_maxlen < 1 or queue_max < 1:
            raise ValueError("maxlen, security_maxlen and queue_max must be positive")
        self.redis = redis
        self.stream = stream
        self.security_stream = security_stream
        self.maxlen = maxlen
        self.security_maxlen = security_maxlen
        self.queue_max = queue_max
        self._append = script_for(redis, script_source("audit_append.lua"))
        self._queue: collections.deque[dict[str, str]] = collections.deque()
        self._wakeup = asyncio.Event()  # something is queued
        self._full = asyncio.Event()  # a whole batch is queued
        self._lock = asyncio.Lock()  # one writer at a time keeps the stream in order
        self._last_write = float("-inf")
        self._dropped = 0  # since the trail was created
        self._dropped_reported = 0
        self._last_drop_warning = float("-inf")
        self._last_error_warning = float("-inf")
        self._write_failures = 0

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return len(self._queue)

    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full (Redis unreachable for long)."""
        return self._dropped

    @property
    def write_failures(self) -> int:
        """Failed batch writes so far (each is retried)."""
        return self._write_failures

    def _enqueue(self, entry: dict[str, str]) -> None:
        if len(self._queue) >= self.queue_max:
            self._queue.popleft()
            self._dropped += 1
            self._warn_dropped()
        self._queue.append(entry)
        self._wakeup.set()
        if len(self._queue) >= BATCH_MAX:
            self._full.set()

    def _warn_dropped(self, *, force: bool = False) -> None:
        new = self._dropped - self._dropped_reported
        now = time.monotonic()
        if new and (force or now - self._last_drop_warning >= WARN_INTERVAL):
            self._last_drop_warning = now
            self._dropped_reported = self._dropped
            log.warning(
                "audit trail: queue full (%d records), dropped %d oldest records "
                "(%d since start); Redis unreachable?",
                self.queue_max,
                new,
                self._dropped,
                extra={"dropped": new, "dropped_total": self._dropped},
            )

    def _requeue(self, batch: list[dict[str, str]]) -> None:
        """Put a batch that was not written back in front, keeping the bound."""
        self._queue.extendleft(reversed(batch))
        while len(self._queue) > self.queue_max:
            self._queue.popleft()
            self._dropped += 1

    async def _write_batch(self) -> None:
        async with self._lock:
            n = min(len(self._queue), BATCH_MAX)
            if n == 0:
                return
            batch = [self._queue.popleft() for _ in range(n)]
            try:  # one command (NOSCRIPT: the script did not run; it is loaded and run)
                secure = [entry for entry in batch if SECURITY_PENDING in entry]
                if secure:  # first: a retry after a failure below does not write them twice
                    await guarded(
                        self._append,
                        keys=[self.security_stream],
                        args=_append_args(self.security_maxlen, secure),
                    )
                    for entry in secure:
                        del entry[SECURITY_PENDING]
                await guarded(
                    self._append, keys=[self.stream], args=_append_args(self.maxlen, batch)
                )
            except BaseException:  # failed or cancelled: the records were not (all) written
                self._requeue(batch)
                raise
            self._last_write = asyncio.get_running_loop().time()
            if not self._queue:
                self._full.clear()

    async def flush(self) -> None:
        """Write everything queued now, in batches.

        Raises:
            tokensvc.store.StoreUnavailable: Redis is unreachable (the records stay queued);
                other Redis errors as raised by redis-py.
        """
        while True:
            # a cancelled caller does not interrupt a write half-way (which would leave
            # it unknown what was written, and write it again): the batch finishes, and
            # whoever writes next waits for it on the lock -- as does this flush, so it
            # returns after a write still in flight, even with nothing left queued
            write = asyncio.ensure_future(self._write_batch())
            write.add_done_callback(_retrieve)
            await asyncio.shield(write)
            if not self._queue:
                break
        if self._dropped > self._dropped_reported:
            self._warn_dropped(force=True)

    async def _next_batch(self) -> None:
        """Return when there is something to write and the batch interval has passed (or a
        whole batch waits)."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = asyncio.get_running_loop()
        delay = self._last_write + BATCH_INTERVAL - loop.time()
        if delay > 0 and len(self._queue) < BATCH_MAX:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), delay)

    async def run(self) -> None:
        """Write queued records until cancelled; retry with backoff while Redis fails.

        On cancellation, tries once more (for up to 3 s) to write what is queued, then
        re-raises :class:`asyncio.CancelledError`.
        """
        backoff = 0.0
        baseline = cancelling_count()
        try:
            while True:
                await self._next_batch()
                if cancelled_since(baseline):
                    raise asyncio.CancelledError
                try:
                    await self.flush()
                    if backoff:
                        log.info("audit trail: writing to Redis again")
                    backoff = 0.0
                except Exception as err:
                    self._write_failures += 1
                    backoff = min(BACKOFF_MAX, backoff * 2) if backoff else BACKOFF_FIRST
                    now = time.monotonic()
                    if now - self._last_error_warning >= WARN_INTERVAL:
                        self._last_error_warning = now
                        log.warning(
                            "audit trail: cannot write to Redis (%s: %s); %d records queued, "
                            "retrying",
                            type(err).__name__,
                            err,
                            len(self._queue),
                        )
                    self._warn_dropped()
                    await asyncio.sleep(backoff)
                if cancelled_since(baseline):
                    raise asyncio.CancelledError
        except asyncio.CancelledError:
            try:  # what is queued, and a batch that may still be in flight
                await asyncio.wait_for(self.flush(), FINAL_FLUSH_TIMEOUT)
            except Exception as err:
                log.warning(
                    "audit trail: %d records not written at shutdown (%s)",
                    len(self._queue),
                    type(err).__name__,
                )
            raise


def _append_args(maxlen: int, batch: list[dict[str, str]]) -> list[str | int]:
    """The audit_append script's arguments: MAXLEN, then per record N and its N pairs."""
    args: list[str | int] = [maxlen]
    for entry in batch:
        fields = [(k, v) for k, v in entry.items() if k != SECURITY_PENDING]
        args.append(len(fields))
        for pair in fields:
            args.extend(pair)
    return args
