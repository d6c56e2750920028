"""The sans-IO core of the revocation feed, shared by the blocking and the asyncio feed.

:class:`_FeedCore` holds the revocation set, the resume position, the connection state,
the reconnection :class:`Backoff` and the staleness policy (:class:`FeedStale`); the
drivers in :mod:`tokensvc_client.revocation_feed` only do the I/O and report to it, so
the two feeds cannot drift apart. :class:`FeedStats` is what a feed reports for metrics.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tokensvc_client import _metrics
from tokensvc_client.errors import TokenServiceError
from tokensvc_client.revocations import RevocationSet
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Claims

__all__ = ["STALE_WARNING_INTERVAL", "Backoff", "FeedStale", "FeedStats", "_FeedCore"]

log = logging.getLogger("tokensvc_client.revocations")

#: Warn about a stale feed at most this often, seconds.
STALE_WARNING_INTERVAL: Final = 60.0


class FeedStale(TokenServiceError):
    """The revocation feed has been down longer than ``max_staleness`` and the feed fails
    closed: the interceptor refuses the call (UNAVAILABLE)."""


def _event_key(event_id: str) -> tuple[int, int] | None:
    """A stream id ``MS-SEQ`` as a pair to compare (None: no id, or not one)."""
    ms, dash, seq = event_id.partition("-")
    if not dash or not ms.isdigit() or not seq.isdigit():
        return None
    return int(ms), int(seq)


class Backoff:
    """Exponential backoff with jitter: attempt ``n`` waits a random time between half and
    all of ``min(cap, base * 2**n)`` seconds."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        if not 0 < base <= cap:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base, self.cap = base, cap
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, 60))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 -- jitter, not a secret

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class FeedStats:
    """Counters of a feed, for metrics."""

    #: events received (RESET included)
    events: int
    #: streams opened after the first one (each disconnection costs one)
    reconnects: int
    #: RESET events seen: full resynchronisations
    resets: int
    #: checks answered while the feed was stale (from the last known set, or refused)
    stale_checks: int
    #: entries held now
    entries: int
    connected: bool
    healthy: bool


class _FeedCore:
    """What the blocking and the asyncio feed share: the set, the resume position, the
    connection state, the reconnection backoff and the staleness policy. The drivers only
    do the I/O, and tell the core what happened to which stream (by its number, so a late
    report about an ended stream changes nothing).

    A stream counts as up once it delivered headers or an event, or -- for a resumed
    stream with nothing new to send, whose headers gRPC may hold back until the first
    event -- once it has stayed open :attr:`settle` seconds on a READY channel: a refused
    call (unknown method, denied, Redis down behind the server) ends well before that.
    """

    def __init__(
        self,
        *,
        max_staleness: float,
        fail_closed: bool,
        backoff: tuple[float, float],
        clock: Callable[[], float],
        revocations: RevocationSet | None,
    ) -> None:
        if not max_staleness > 0:
            raise ValueError("max_staleness must be positive")
        self.revocations = revocations if revocations is not None else RevocationSet(clock=clock)
        self.max_staleness = float(max_staleness)
        self.fail_closed = bool(fail_closed)
        self.backoff = Backoff(*backoff)
        #: seconds an open stream on a READY channel takes to count as up without an event
        self.settle = min(0.5, self.max_staleness / 4)
        self.last_event_id = ""
        self.connected = False
        #: monotonic time the feed went down (or was started); None while connected
        self.down_since: float | None = time.monotonic()
        self.events = 0
        self.streams = 0
        self.stale_checks = 0
        #: monotonic times of the start and of the last event (the last-event-age metric)
        self.started_at = time.monotonic()
        self.last_event_at: float | None = None
        _metrics.track_feed(self)
        self._open = False
        self._stream_started = 0.0
        self._stream_events = 0
        self._last_warning = -math.inf
        self._lock = threading.Lock()
        self.ready = threading.Event()
        #: called on every KEY event (a signing key revoked): the JWKS caches to refresh
        self.key_listeners: list[Callable[[], None]] = []
        #: the last event id of this stream as a number pair (None: no order to keep yet)
        self._position: tuple[int, int] | None = None
        #: times the server's ids went backwards and the feed started over
        self.backward_jumps = 0

    # -- driver side ----------------------------------------------------------------------

    def begin(self) -> tuple[int, pb.WatchRevocationsRequest]:
        """A new stream: its number, and its request (resuming from the last event id)."""
        with self._lock:
            self.streams += 1
            if self.streams > 1:
                _metrics.TOTALS.feed_reconnects += 1
            self._open = True
            self._stream_started = time.monotonic()
            self._stream_events = 0
            self._position = _event_key(self.last_event_id)
            return self.streams, pb.WatchRevocationsRequest(resume_from=self.last_event_id)

    def on_connected(self, stream: int) -> None:
        """Stream ``stream`` is up."""
        if self.connected:
            return
        with self._lock:
            if self.connected or not self._open or stream != self.streams:
                return
            self.connected = True
            down, self.down_since = self.down_since, None
        self.ready.set()
        if stream > 1 and down is not None:
            log.info(
                "revocation feed connected after %.1f s down (resumed from %r)",
                time.monotonic() - down,
                self.last_event_id,
            )

    def settled(self, stream: int, open_: bool, channel_ready: bool) -> bool:
        """The driver's periodic probe of a stream without headers or events yet; whether
        to stop probing."""
        if self.connected or not open_ or stream != self.streams:
            return True
        if channel_ready and time.monotonic() - self._stream_started >= self.settle:
            self.on_connected(stream)
            return True
        return False

    def on_event(self, stream: int, event: pb.RevocationEvent) -> bool:
        """Apply an event of stream ``stream``; False when the driver must end the stream
        and start over (see :meth:`_went_backwards`)."""
        self.revocations.apply(event)
        if self._went_backwards(event):
            self._count_event(stream, event)
            return False
        if event.kind == pb.RevocationEvent.KEY:
            for listener in self.key_listeners:
                listener()
        self._count_event(stream, event)
        if event.id:
            self.last_event_id = event.id
        if not self.connected:
            self.on_connected(stream)
        return True

    def _went_backwards(self, event: pb.RevocationEvent) -> bool:
        """Whether ``event``'s id is not after the last one this feed had (outside a
        ``RESET``'s snapshot, which starts over): the server's history no longer holds
        our position (its Redis failed over to a replica that lacked entries, or was
        restored; or another server behind it answered). The feed then forgets its
        position, so the next stream starts with ``RESET`` and everything in force."""
        if event.kind == pb.RevocationEvent.RESET:
            self._position = None  # a snapshot follows, in its own order
            return False
        key = _event_key(event.id)
        if key is None:
            return False
        if self._position is not None and key <= self._position:
            log.warning(
                "revocation feed went back from %r to %r: the server lost history; starting over",
                self.last_event_id,
                event.id,
            )
            self.last_event_id = ""
            self._position = None
            self.backward_jumps += 1
            return True
        self._position = key
        return False

    def _count_event(self, stream: int, event: pb.RevocationEvent) -> None:
        self.events += 1
        _metrics.TOTALS.feed_events += 1
        self.last_event_at = time.monotonic()
        self._stream_events += 1

    def end(self, stream: int, why: str, *, closing: bool = False) -> float:
        """Stream ``stream`` ended (``closing``: because the feed is closed); returns how
        long to wait before the next one."""
        with self._lock:
            if stream != self.streams:
                return 0.0
            self._open = False
            was_connected, self.connected = self.connected, False
            if was_connected:
                self.down_since = time.monotonic()
                self.ready.clear()
            lasted = time.monotonic() - self._stream_started
            if self._stream_events or lasted >= self.backoff.cap:
                self.backoff.reset()
            delay = self.backoff.next_delay()
        if closing:
            log.debug("revocation feed closed")
        elif was_connected:
            log.warning("revocation feed disconnected (%s); reconnecting", why)
        else:
            log.debug("revocation feed not connected (%s); retry in %.2f s", why, delay)
        return delay

    def restart_clock(self) -> None:
        """The feed starts: it has been down since now, not since it was made."""
        with self._lock:
            if not self.connected:
                self.down_since = time.monotonic()

    # -- interceptor side -----------------------------------------------------------------

    def stale(self) -> bool:
        down = self.down_since
        return down is not None and time.monotonic() - down > self.max_staleness

    def check(self, claims: Claims) -> bool:
        if self.revocations.is_revoked(claims):
            return True
        if self.down_since is not None and self.stale():
            self._on_stale()
        return False

    def _on_stale(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.stale_checks += 1
            warn = now - self._last_warning >= STALE_WARNING_INTERVAL
            if warn:
                self._last_warning = now
            down = now - (self.down_since or now)
        if warn:
            log.warning(
                "revocation feed down for %.0f s (max %.0f s): %s",
                down,
                self.max_staleness,
                "refusing calls"
                if self.fail_closed
                else "checking calls against the last known revocations",
            )
        if self.fail_closed:
            raise FeedStale(f"revocation feed down longer than {self.max_staleness:g} s")

    def stats(self) -> FeedStats:
        return FeedStats(
            events=self.events,
            reconnects=max(0, self.streams - 1),
            resets=self.revocations.resets,
            stale_checks=self.stale_checks,
            entries=len(self.revocations),
            connected=self.connected,
            healthy=not self.stale(),
        )
