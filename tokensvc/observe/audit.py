"""The audit trail: one Redis Stream entry per security event, and a structured log event.

:meth:`AuditTrail.record` is what request handlers call. It is synchronous, never waits
for Redis and never raises: it queues the event's fields, plus ``ts`` (epoch
milliseconds), for the background task :meth:`AuditTrail.run`, which appends them to the
capped stream ``ts:audit`` in batches: one call of a script doing ``XADD ts:audit MAXLEN ~
<maxlen> * field value ...`` per record (one command per batch, not one per record), at
most every 50 ms or as soon as 256 records wait. It also logs the event at once on the
``tokensvc.audit`` logger (WARNING for ``reuse_detected``, ``bound_token_misuse``,
``denied``, ``auth_failed`` and ``locked``, INFO for everything else) -- except the
routine, high-volume ``issued``, ``refreshed``, ``exchanged`` and ``txn_token_minted``,
which are logged only with ``log_routine`` (``--audit-log-all``); the stream always has
every event.

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
``tokensvc audit tail`` (:mod:`tokensvc.observe.audit_tail`) and tools reading it with
``XRANGE``/``XREAD``.

This module builds the records (fields, redaction, names) and logs them; the queue and the
batched writes are its base class, :class:`tokensvc.observe.audit_writer.AuditWriter`.

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
import logging
import re
import time
from typing import Final, Unpack

from tokensvc.observe import metrics
from tokensvc.observe.audit_writer import (
    SECURITY_PENDING,
    WARN_INTERVAL,
    AuditWriter,
    WriterOptions,
)
from tokensvc.observe.tracing import current_trace_id
from tokensvc.redis.connection import RedisClient
from tokensvc_client.verifier import REFRESH_TOKEN_PREFIX

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
#: One per Issue / Refresh / Exchange / MintTransactionToken (a call chain mints one per
#: hop and request): logged only with ``log_routine`` (always in the stream). Refusals of
#: any of them are not routine.
ROUTINE_EVENTS: Final = frozenset({"issued", "refreshed", "exchanged", "txn_token_minted"})
#: Routine events logged all the same when a field has a value: an impersonating exchange
#: (rare and powerful, where a delegation is one per hop and request).
NOTABLE: Final = {"exchanged": ("impersonated", "1")}
#: Longest value stored; longer ones are cut (ids are far shorter).
MAX_VALUE_CHARS: Final = 256

REDACTED: Final = "[redacted]"
#: Events any caller can cause at will: their log lines are rate-limited (:data:`LOG_BURST`).
_CALLER_CAUSED: Final = frozenset({"denied", "auth_failed", "rate_limited", "exchange_denied"})
#: The shared log budget of the peers beyond :data:`LOG_PEERS_MAX` (not a peer name).
_OTHER_PEERS: Final = "(other peers)"
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


def _clean(value: object) -> str:
    shown = value if isinstance(value, str) else str(value)
    if _TOKEN_LIKE.search(shown):
        return REDACTED
    return shown[:MAX_VALUE_CHARS]


def _notable(event: str, fields: dict[str, str]) -> bool:
    """Whether a routine event is logged all the same (:data:`NOTABLE`)."""
    rule = NOTABLE.get(event)
    return rule is not None and fields.get(rule[0]) == rule[1]


def _field_name(key: str) -> str:
    return f"x_{key}" if key in _RESERVED else key


class AuditTrail(AuditWriter):
    """Audit events to the log at once and to a capped Redis Stream in the background.

    Call :meth:`record` from request handlers (on the event loop's thread), run
    :meth:`run` as a task for the life of the server, and cancel and await that task
    before closing the Redis client: on cancellation it writes what is still queued
    (for up to 3 s). ``log_routine`` also logs the :data:`ROUTINE_EVENTS`; ``options``
    are the writer's (:class:`~tokensvc.observe.audit_writer.AuditWriter`).
    """

    def __init__(
        self, redis: RedisClient, *, log_routine: bool = False, **options: Unpack[WriterOptions]
    ) -> None:
        super().__init__(redis, **options)
        self.log_routine = log_routine
        #: lines per (event, peer) this interval
        self._logged: collections.Counter[tuple[str, str]] = collections.Counter()
        self._log_interval_start = float("-inf")
        self._suppressed: collections.Counter[tuple[str, str]] = collections.Counter()
        self._suppressed_report: asyncio.TimerHandle | None = None
        #: counts each record as a metric (the server sets it when metrics are exported)
        self.metrics: metrics.ServerMetrics = metrics.DISABLED

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
            if self.log_routine or event not in ROUTINE_EVENTS or _notable(event, fields):
                self._log(event, fields)
            self.metrics.audit_event(event, fields)
            entry = {**fields, "ts": str(time.time_ns() // 1_000_000)}
            if event in SECURITY_EVENTS:
                entry[SECURITY_PENDING] = "1"
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
