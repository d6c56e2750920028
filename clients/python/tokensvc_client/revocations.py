"""What an interceptor knows is revoked: :class:`RevocationSet`, filled by the revocation
feed (:mod:`tokensvc_client.revocation_feed`) and checked on every call.

What a check costs: at most five dict lookups (jti, session id, subject watermark by the
session's subject tag or by name, key id)
and a bounded amount of expiry work -- independent of how many revocations are held. It
never blocks and never does I/O, so it is safe on gRPC's polling thread and on an event
loop.

Memory: every entry carries the time after which every token it covers has expired; it is
dropped then. So the set holds what is in force, never more: a burst of 100 000
revocations costs memory only until those tokens would have expired anyway.

``RESET`` does not empty the set: revocations are never undone, so what was known stays in
force -- until it expires -- while the new snapshot arrives, and no revoked token slips
through between the reset and the end of the snapshot (the stream has no end marker).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Claims

__all__ = ["FALLBACK_TTL_SECONDS", "RevocationSet"]


Event = pb.RevocationEvent
_RESET: Final = Event.RESET
_TOKEN: Final = Event.TOKEN
_SESSION: Final = Event.SESSION
_SUBJECT: Final = Event.SUBJECT
_KEY: Final = Event.KEY
#: RevocationSet's tables by kind
_TABLES: Final = (
    (_TOKEN, "_tokens"),
    (_SESSION, "_sessions"),
    (_SUBJECT, "_subjects"),
    (_KEY, "_keys"),
)

#: A SUBJECT event's value: the subject's tag, this many leading characters of its session
#: ids (see tokensvc.families.tokens.SubjectTags).
SUBJECT_TAG_LENGTH: Final = 32
_TAG: Final = SUBJECT_TAG_LENGTH
#: How long an entry is kept when its event carries no ``expires_at`` (the server always
#: sends one; this only bounds memory should one be missing). Above any access TTL.
FALLBACK_TTL_SECONDS: Final = 86_400.0


def _seconds(ts: Timestamp) -> float:
    """A protobuf Timestamp as UNIX seconds."""
    return float(ts.seconds) + ts.nanos / 1e9


class RevocationSet:
    """The revocations in force, in memory; no I/O (the feeds drive it).

    Four tables -- revoked jti, session ids, subject watermarks (by subject tag: tokens of
    sessions with that tag and ``iat`` before ``revoked_before``) and key ids -- each entry
    with the expiry after which it covers no unexpired token, plus one min-heap of
    ``(expiry, kind, key)`` that finds expired entries without scanning. Every :meth:`apply`
    and :meth:`is_revoked` first drops at most :attr:`PRUNE_BATCH` expired heap entries;
    since every insertion pushes at most one heap entry, pruning keeps up with insertion
    (amortised O(1)) while no call does more than a constant amount of it. A table that
    shrank below a quarter of its peak is copied, so Python's dicts -- which never shrink by
    deletion -- give the memory back.

    Threads: one writer at a time (the lock guards :meth:`apply` and pruning) and any
    number of readers without a lock: lookups are single ``dict`` operations, atomic
    under the GIL (and internally locked on free-threaded builds). A table is only ever
    replaced whole, by assignment, so a reader sees either the old or the new one -- both
    hold every entry still in force.

    Args:
        clock: current UNIX time; compared with the events' ``expires_at``. Use the same
            clock as the interceptor's verifier (both default to :func:`time.time`).
    """

    #: heap entries examined per operation at most
    PRUNE_BATCH: Final = 16
    #: tables smaller than this are never compacted
    _COMPACT_MIN: Final = 1024

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: dict[str, float] = {}
        self._sessions: dict[str, float] = {}
        self._keys: dict[str, float] = {}
        #: subject -> (revoked_before, expiry)
        self._subjects: dict[str, tuple[float, float]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._peaks: dict[int, int] = dict.fromkeys((_TOKEN, _SESSION, _SUBJECT, _KEY), 0)
        self._lock = threading.Lock()
        #: RESET events seen
        self.resets = 0
        #: heap entries popped so far (expired entries dropped, or superseded ones)
        self.pruned = 0

    def __len__(self) -> int:
        """Entries held (in force, or expired and not yet dropped)."""
        return len(self._tokens) + len(self._sessions) + len(self._subjects) + len(self._keys)

    @property
    def pending(self) -> int:
        """Heap entries waiting for their expiry (at least ``len(self)``)."""
        return len(self._heap)

    def is_revoked(self, claims: Claims) -> bool:
        """Whether the token of ``claims`` is revoked: by its jti, its session, its
        subject's watermark (``iat`` before ``revoked_before``) or its signing key."""
        try:
            due = self._heap[0][0] <= self._clock()
        except IndexError:  # empty (possibly emptied by the writer just now)
            due = False
        if due:
            self._prune_nowait()
        if claims.token_id in self._tokens or claims.session_id in self._sessions:
            return True
        # SUBJECT events name the subject's tag, the first half of its session ids (a
        # keyed hash: the feed never names a subject); servers before keyed tags sent the
        # subject itself. (One line each: a lookup's cost is measured in lines.)
        mark = self._subjects.get(claims.session_id[:_TAG]) or self._subjects.get(claims.subject)
        if mark is not None and claims.issued_at < mark[0]:
            return True
        return claims.key_id in self._keys

    def apply(self, event: pb.RevocationEvent) -> None:
        """Take one event of the stream into account.

        ``RESET`` keeps what is known (see the module doc); events of an unknown kind,
        without a value, or already expired are ignored.
        """
        now = self._clock()
        with self._lock:
            self._prune(now)
            kind = event.kind
            if kind == _RESET:
                self.resets += 1
                return
            if not event.value or kind not in self._peaks:
                return
            if event.HasField("expires_at"):
                expiry = _seconds(event.expires_at)
            else:
                expiry = now + FALLBACK_TTL_SECONDS
            if expiry <= now:
                return
            if kind == _SUBJECT:
                self._add_watermark(event, expiry, now)
            else:
                self._add(self._table(kind), kind, event.value, expiry)

    def prune(self) -> None:
        """Drop every expired entry now (lookups and events do it a little at a time)."""
        now = self._clock()
        with self._lock:
            self._prune(now, math.inf)

    # -- internals (the lock held) --------------------------------------------------------

    def _table(self, kind: int) -> dict[str, float]:
        if kind == _TOKEN:
            return self._tokens
        return self._sessions if kind == _SESSION else self._keys

    def _add(self, table: dict[str, float], kind: int, key: str, expiry: float) -> None:
        known = table.get(key)
        if known is not None and known >= expiry:
            return  # e.g. the same entry again in a snapshot after RESET
        table[key] = expiry
        heapq.heappush(self._heap, (expiry, kind, key))
        self._peaks[kind] = max(self._peaks[kind], len(table))

    def _add_watermark(self, event: pb.RevocationEvent, expiry: float, now: float) -> None:
        # without revoked_before (the server always sends it): every token issued so far
        before = _seconds(event.revoked_before) if event.HasField("revoked_before") else now
        known = self._subjects.get(event.value)
        if known is not None:
            if known[0] >= before and known[1] >= expiry:
                return
            before, expiry = max(before, known[0]), max(expiry, known[1])
        self._subjects[event.value] = (before, expiry)
        if known is None or expiry > known[1]:
            heapq.heappush(self._heap, (expiry, _SUBJECT, event.value))
        self._peaks[_SUBJECT] = max(self._peaks[_SUBJECT], len(self._subjects))

    def _prune_nowait(self) -> None:
        # from a lookup: never wait for the writer; it prunes too
        if self._lock.acquire(blocking=False):
            try:
                self._prune(self._clock())
            finally:
                self._lock.release()

    def _prune(self, now: float, budget: float = PRUNE_BATCH) -> None:
        heap = self._heap
        dropped = 0
        while budget > 0 and heap and heap[0][0] <= now:
            expiry, kind, key = heapq.heappop(heap)
            budget -= 1
            dropped += 1
            if kind == _SUBJECT:
                mark = self._subjects.get(key)
                if mark is not None and mark[1] <= expiry:
                    del self._subjects[key]
            else:
                table = self._table(kind)
                known = table.get(key)
                # a later expiry means the entry was extended: its own heap entry follows
                if known is not None and known <= expiry:
                    del table[key]
        if dropped:
            self.pruned += dropped
            self._compact()

    def _compact(self) -> None:
        # an O(len) copy, paid for by the 3 * len deletions (at least) before it
        for kind, name in _TABLES:
            table = getattr(self, name)
            peak = self._peaks[kind]
            if len(table) * 4 < peak and (peak >= self._COMPACT_MIN or not table):
                setattr(self, name, dict(table))
                self._peaks[kind] = len(table)
