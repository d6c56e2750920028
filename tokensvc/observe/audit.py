"""The audit trail: one Redis Stream entry per security event, and a structured log event.

:meth:`AuditTrail.record` is what request handlers call. It is synchronous, never waits
for Redis and never raises: it queues the event's fields, plus ``ts`` (epoch
milliseconds), for the background task :meth:`AuditTrail.run`, which appends them to the
capped stream ``ts:audit`` in batches: one call of a script doing ``XADD ts:audit MAXLEN ~
<maxlen> * field value ...`` per record (one command per batch, not one per record), at
most every 50 ms or as soon as 256 records wait. It also logs the event at once on the
``tokensvc.observe.audit`` logger (WARNING for ``reuse_detected``, ``bound_token_misuse``,
``denied``, ``auth_failed`` and ``locked``, INFO for everything else) -- except the
routine, high-volume ``issued`` and ``refreshed``, which are logged only with
``log_routine`` (``--audit-log-all``); the stream always has every event.

Security events (:data:`SECURITY_EVENTS`: reuse, a bound token presented by another
certificate, revocations, locks, key changes) are also appended, first, to
``ts:audit:security``, which only they trim: the noise of refused calls can evict them
from ``ts:audit`` but not from there (``tokensvc audit tail --security``), and their log
lines are never rate-limited. Noise is bounded at the source too: the admission guard
refuses a peer over its limit without a record per call and reports the count with
:meth:`suppress` (a ``suppressed`` record per peer every 10 s), and the WARNING/INFO
lines of the events a caller can cause at will (``denied``, ``auth_failed``,
``rate_limited``) are logged at most 20 times per event *and peer* and 10 s, then summed
up in one line per event: one peer's garbage cannot silence another peer's failures.

If Redis is unreachable the records stay queued and the task retries with backoff
(0.1 s doubling to 5 s). The queue is bounded (10 000 records by default): when it is full
the oldest record is dropped and counted, and a warning with the count is logged at most
once per 10 s. Delivery to the stream is at least once: a batch whose reply was lost is
written again. The log event is the record of last resort; the stream is for
``tokensvc audit tail`` and tools reading it with ``XRANGE``/``XREAD``.

Callers pass identifiers only -- subject, session id, jti, peer identity, a short reason --
never a token, refresh token hash, key or secret; the signature has no parameter for one.
As a defence in depth, any value that looks like a token (a refresh token's ``tsr1_``
prefix, a JWS ``eyJ...``) is replaced by ``[redacted]``, and values are cut to 256
characters. Extra field names that would collide with log record attributes or with the
``ts``/``id`` keys of the stream output are prefixed with ``x_``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from tokensvc.observe import metrics
from tokensvc.observe.tracing import current_trace_id
from tokensvc.proc.tasks import cancelled_since, cancelling_count
from tokensvc.redis.connection import RedisClient
from tokensvc.redis.lean import script_for
from tokensvc.store import guarded, text
from tokensvc.store.calls import script_source
from tokensvc_client.verifier import REFRESH_TOKEN_PREFIX

AUDIT_STREAM: Final = "ts:audit"
#: The security events again, in a stream of their own that only they trim (the noise of
#: refused calls cannot evict them): see :data:`SECURITY_EVENTS`.
SECURITY_STREAM: Final = "ts:audit:security"

log = logging.getLogger("tokensvc.audit")

#: Events logged at WARNING; every other event is INFO.
WARNING_EVENTS: Final = frozenset(
    {"reuse_detected", "bound_token_misuse", "denied", "auth_failed", "locked"}
)
#: Events that are also written to :data:`SECURITY_STREAM` (and always logged).
#: ``bound_token_misuse``: a token bound to one certificate presented with another
#: (RFC 8705 ``certificate_mismatch``: it was stolen); a caller causes it only with a
#: genuine bound token, and the failed-authentication limits bound how often.
SECURITY_EVENTS: Final = frozenset(
    {
        "reuse_detected",
        "bound_token_misuse",
        "revoked",
        "locked",
        "unlocked",
        "keys_rotated",
        "key_retired",
    }
)
#: Log lines per event, peer and :data:`WARN_INTERVAL` for the events a caller can cause
#: at will (``denied``, ``auth_failed``, ``rate_limited``); beyond, one summary line per
#: event and interval.
LOG_BURST: Final = 20
#: Peers whose lines are counted apart per interval; beyond, the others share one budget
#: per event (bounds the memory, and the lines, of a flood from ever new peers).
LOG_PEERS_MAX: Final = 1024
#: How often the calls refused without an audit record each are reported, seconds.
SUPPRESSED_INTERVAL: Final = 10.0
#: One per Issue / Refresh: logged only with ``log_routine`` (always in the stream).
ROUTINE_EVENTS: Final = frozenset({"issued", "refreshed"})
#: Longest value stored; longer ones are cut (ids are far shorter).
MAX_VALUE_CHARS: Final = 256
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
#: XREAD BLOCK of `tail --follow`, milliseconds (below any sane client socket timeout).
FOLLOW_BLOCK_MS: Final = 1000

REDACTED: Final = "[redacted]"
#: Events any caller can cause at will: their log lines are rate-limited (:data:`LOG_BURST`).
_CALLER_CAUSED: Final = frozenset({"denied", "auth_failed", "rate_limited", "exchange_denied"})
#: The shared log budget of the peers beyond :data:`LOG_PEERS_MAX` (not a peer name).
_OTHER_PEERS: Final = "(other peers)"
#: Marks a queued security record not yet written to the security stream (never stored).
_SECURITY_PENDING: Final = "\0security"
_TOKEN_LIKE = re.compile(re.escape(REFRESH_TOKEN_PREFIX) + r"|eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]")
_CORE_FIELDS: Final = ("event", "peer", "subject", "session_id", "jti", "reason")
# names an extra field must not take: LogRecord attributes (logging refuses them in
# `extra`), the JSON log line's own keys, and the stream entry's `ts` and tail's `id`
_RESERVED: Final = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "ts",
    "level",
    "logger",
    "msg",
    "exc",
    "id",
    "trace_id",
    *_CORE_FIELDS,
}


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a shielded write's exception as seen (its caller may have been cancelled)."""
    if not task.cancelled():
        task.exception()


def _clean(value: object) -> str:
    shown = value if isinstance(value, str) else str(value)
    if _TOKEN_LIKE.search(shown):
        return REDACTED
    return shown[:MAX_VALUE_CHARS]


def _field_name(key: str) -> str:
    return f"x_{key}" if key in _RESERVED else key


class AuditTrail:
    """Audit events to the log at once and to a capped Redis Stream in the background.

    Call :meth:`record` from request handlers (on the event loop's thread), run
    :meth:`run` as a task for the life of the server, and cancel and await that task
    before closing the Redis client: on cancellation it writes what is still queued
    (for up to 3 s). ``log_routine`` also logs the ``issued`` and ``refreshed`` events.
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
        log_routine: bool = False,
    ) -> None:
        if maxlen < 1 or security_maxlen < 1 or queue_max < 1:
            raise ValueError("maxlen, security_maxlen and queue_max must be positive")
        self.redis = redis
        self.stream = stream
        self.security_stream = security_stream
        self.maxlen = maxlen
        self.security_maxlen = security_maxlen
        self.queue_max = queue_max
        self.log_routine = log_routine
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
        #: lines per (event, peer) this interval
        self._logged: collections.Counter[tuple[str, str]] = collections.Counter()
        self._log_interval_start = float("-inf")
        self._suppressed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._suppressed_report: asyncio.TimerHandle | None = None
        #: counts each record as a metric (the server sets it when metrics are exported)
        self.metrics: metrics.ServerMetrics = metrics.DISABLED

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

    def record(
        self,
        event: str,
        *,
        peer: str = "",
        subject: str = "",
        session_id: str = "",
        jti: str = "",
        reason: str = "",
        **extra: str | int,
    ) -> None:
        """Log one audit event now and queue it for the stream. Never blocks, never raises.

        Pass identifiers only (never a token, refresh token hash, key or secret). Empty
        values are left out; values are cut to 256 characters, token-like ones redacted.
        """
        try:
            fields: dict[str, str] = {}
            core = (event, peer, subject, session_id, jti, reason)
            for name, value in zip(_CORE_FIELDS, core, strict=True):
                if value:
                    fields[name] = _clean(value)
            trace_id = current_trace_id()
            if trace_id:
                fields["trace_id"] = trace_id
            for key, item in extra.items():
                if item is not None and item != "":
                    fields[_field_name(key)] = _clean(item)
            if self.log_routine or event not in ROUTINE_EVENTS:
                self._log(event, fields)
            self.metrics.audit_event(event, fields)
            entry = {**fields, "ts": str(time.time_ns() // 1_000_000)}
            if event in SECURITY_EVENTS:
                entry[_SECURITY_PENDING] = "1"
            self._enqueue(entry)
        except Exception:  # the request path must not fail because of auditing
            with contextlib.suppress(Exception):
                log.exception("audit record failed")

    def _log(self, event: str, fields: dict[str, str]) -> None:
        """Log the event: WARNING or INFO; the events a caller can cause at will at most
        :data:`LOG_BURST` times per event, peer and interval (the stream still has each)."""
        level = logging.WARNING if event in WARNING_EVENTS else logging.INFO
        if event in _CALLER_CAUSED:
            now = time.monotonic()
            if now - self._log_interval_start >= WARN_INTERVAL:
                self._report_unlogged()
                self._log_interval_start = now
            budget = (event, fields.get("peer", ""))
            if budget not in self._logged and len(self._logged) >= LOG_PEERS_MAX:
                budget = (event, _OTHER_PEERS)
            self._logged[budget] += 1
            if self._logged[budget] > LOG_BURST:
                return
        log.log(level, "audit %s", fields.get("event", ""), extra=fields)

    def _report_unlogged(self) -> None:
        """One line per event whose lines were cut short this interval: how many, from how
        many peers, and the peer with the most."""
        unlogged: dict[str, collections.Counter[str]] = {}
        for (event, peer), n in self._logged.items():
            if n > LOG_BURST:
                unlogged.setdefault(event, collections.Counter())[peer] = n - LOG_BURST
        for event, peers in sorted(unlogged.items()):
            total = sum(peers.values())
            noisiest = peers.most_common(1)[0][0]
            log.warning(
                "audit: %d more %s events in %.0f s from %d peers not logged "
                "(they are in the stream)",
                total,
                event,
                WARN_INTERVAL,
                len(peers),
                extra={
                    "unlogged": total,
                    "x_event": event,
                    "peers": len(peers),
                    "noisiest_peer": noisiest,
                },
            )
        self._logged.clear()

    def suppress(self, peer: str, event: str) -> None:
        """Count a refused call of ``peer`` that is not audited one by one (the peer is
        over a limit): every :data:`SUPPRESSED_INTERVAL` seconds one ``suppressed`` record
        per peer and event says how many there were. Never blocks, never raises."""
        try:
            self._suppressed[(peer, event)] += 1
            if self._suppressed_report is None:
                loop = asyncio.get_running_loop()
                self._suppressed_report = loop.call_later(
                    SUPPRESSED_INTERVAL, self.report_suppressed
                )
        except Exception:
            with contextlib.suppress(Exception):
                log.exception("audit suppress failed")

    def report_suppressed(self) -> None:
        """Record the calls counted by :meth:`suppress` since the last report."""
        self._suppressed_report = None
        counts, self._suppressed = self._suppressed, collections.Counter()
        for (peer, event), n in sorted(counts.items()):
            self.record("suppressed", peer=peer, reason=event, calls=n)

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
                secure = [entry for entry in batch if _SECURITY_PENDING in entry]
                if secure:  # first: a retry after a failure below does not write them twice
                    await guarded(
                        self._append,
                        keys=[self.security_stream],
                        args=_append_args(self.security_maxlen, secure),
                    )
                    for entry in secure:
                        del entry[_SECURITY_PENDING]
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
        fields = [(k, v) for k, v in entry.items() if k != _SECURITY_PENDING]
        args.append(len(fields))
        for pair in fields:
            args.extend(pair)
    return args


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
