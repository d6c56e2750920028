"""JWKS cache of the interceptors: which keys verify tokens, and when to fetch them again.

The decision logic lives once in :class:`_CacheState` (pure, clock passed in); the blocking
:class:`JwksCache` and the asyncio :class:`AsyncJwksCache` only add a lock and the fetch.

Rules (docs/design.md, Keys):

* Keys come only from the ``fetch`` callable given at construction -- normally
  ``TokenClient.get_keys`` of the configured service. Nothing in a token (``kid``, ``jku``,
  ``x5u`` ...) ever selects where keys come from.
* A key set is used for ``max_age_seconds`` from GetKeys, then fetched again.
* A token whose ``kid`` is not in the set may trigger a refetch, at most once per
  ``min_refetch_interval`` (counted from the last fetch of any kind), so a flood of forged
  kids costs one fetch per interval.
* A failed fetch is logged and the last good key set keeps being served; the next attempt
  waits ``retry_interval``. Only when no key set was ever fetched do verifications fail
  (the interceptor answers UNAVAILABLE).
* A key event of the revocation feed (an emergency rotation removed a key,
  :meth:`_CacheFront.key_event`; the interceptors wire it up) makes the set stale at once,
  and for :data:`KEY_EVENT_WINDOW` seconds an unknown ``kid`` may refetch every
  :data:`KEY_EVENT_INTERVAL` seconds: tokens of the new key verify within a second. A
  flood of events still costs at most one fetch per :data:`KEY_EVENT_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokensvc_client import _metrics
from tokensvc_client.errors import KeysUnavailable
from tokensvc_client.results import Jwks
from tokensvc_client.verifier import KeySet

log = logging.getLogger("tokensvc_client.jwks")

DEFAULT_MIN_REFETCH_INTERVAL = 30.0
DEFAULT_RETRY_INTERVAL = 5.0
#: After a key event, fetches are allowed this often (seconds) ...
KEY_EVENT_INTERVAL = 0.25
#: ... for this long: replicas of the token service may learn of the new key a little later.
KEY_EVENT_WINDOW = 5.0


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """What a verification needs from the cache.

    Attributes:
        lacking: ``None`` asks for the current key set; a key set asks for one *newer*
            than it, because a token's ``kid`` was not in it.
    """

    lacking: KeySet | None = None


CURRENT = KeyRequest()


class _CacheState:
    """The cache's state and every decision about it; no I/O, no locks, no clock."""

    def __init__(self, min_refetch_interval: float, retry_interval: float) -> None:
        if min_refetch_interval < 0 or retry_interval < 0:
            raise ValueError("intervals must not be negative")
        self.min_refetch_interval = min_refetch_interval
        self.retry_interval = retry_interval
        self.keys: KeySet | None = None
        self.stale_at = -math.inf
        self.last_attempt = -math.inf
        self.last_failed = False
        self.last_event = -math.inf  # the last key event that made the set stale

    def needs_fetch(self, request: KeyRequest, now: float) -> bool:
        """Whether answering ``request`` at ``now`` calls for a fetch first."""
        if request.lacking is None:
            if self.keys is not None and now < self.stale_at:
                return False
            return not (self.last_failed and now < self.last_attempt + self.retry_interval)
        if self.keys is not request.lacking:
            return False  # a newer set arrived meanwhile: try that one, no fetch
        interval = self.min_refetch_interval
        if now < self.last_event + KEY_EVENT_WINDOW:
            interval = min(interval, KEY_EVENT_INTERVAL)
        return now >= self.last_attempt + interval

    def key_event(self, now: float) -> None:
        """The key set changed (a key was revoked): fetch again soon, within bounds."""
        if now < self.last_event + KEY_EVENT_INTERVAL:
            return  # a flood of events: one fetch per interval at most
        self.last_event = now
        self.stale_at = min(self.stale_at, max(now, self.last_attempt + KEY_EVENT_INTERVAL))

    def answer(self, request: KeyRequest) -> KeySet | None:
        """The key set to verify with; ``None`` if there is none (or none newer)."""
        if request.lacking is not None and self.keys is request.lacking:
            return None
        return self.keys

    def record(self, now: float, outcome: Jwks | Exception) -> Exception | None:
        """Take the outcome of a fetch started at ``now``; return the error, if any."""
        self.last_attempt = now
        _metrics.TOTALS.fetches += 1
        try:
            if isinstance(outcome, Exception):
                raise outcome
            keys = outcome.key_set()
        except Exception as err:
            self.last_failed = True
            _metrics.TOTALS.fetch_failures += 1
            if self.keys is None:
                log.warning("JWKS fetch failed and no key set is cached: %s", err)
            else:
                log.warning("JWKS fetch failed; serving the last good key set: %s", err)
            return err
        self.keys = keys
        self.stale_at = now + max(1, outcome.max_age_seconds)
        if self.last_event > now:  # an event arrived while this fetch was under way
            self.stale_at = self.last_event + KEY_EVENT_INTERVAL
        self.last_failed = False
        log.debug("JWKS fetched: %d keys, max age %d s", len(keys), outcome.max_age_seconds)
        return None


def _loaded(state: _CacheState, error: Exception | None) -> KeySet:
    if error is not None or state.keys is None:  # keys is set after any success
        raise KeysUnavailable(f"cannot fetch the JWK Set: {error}") from error
    return state.keys


class _CacheFront:
    """What the blocking and asyncio caches share: the state and its non-fetching queries."""

    def __init__(
        self, min_refetch_interval: float, retry_interval: float, clock: Callable[[], float]
    ) -> None:
        self._clock = clock
        self._state = _CacheState(min_refetch_interval, retry_interval)

    def needs_fetch(self, request: KeyRequest = CURRENT) -> bool:
        """Whether ``answer`` would fetch (used to keep fetches off gRPC's poll thread)."""
        return self._state.needs_fetch(request, self._clock())

    def cached(self, request: KeyRequest = CURRENT) -> KeySet | None:
        """Answer from the cache only, never fetching."""
        return self._state.answer(request)

    def key_event(self) -> None:
        """A signing key was revoked (the revocation feed's KEY event): the set is stale
        and tokens of a new key may refetch soon (see the module doc). Never blocks."""
        self._state.key_event(self._clock())


class JwksCache(_CacheFront):
    """Blocking JWKS cache; thread-safe, one fetch at a time.

    Args:
        fetch: returns the service's :class:`~tokensvc_client.results.Jwks`, e.g.
            ``TokenClient(...).get_keys``. The only key source.
        min_refetch_interval: least seconds between fetches caused by unknown kids.
        retry_interval: seconds to wait after a failed fetch.
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        fetch: Callable[[], Jwks],
        *,
        min_refetch_interval: float = DEFAULT_MIN_REFETCH_INTERVAL,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(min_refetch_interval, retry_interval, clock)
        self._fetch = fetch
        self._lock = threading.Lock()

    def answer(self, request: KeyRequest = CURRENT) -> KeySet | None:
        """Answer ``request``, fetching first if the rules call for it."""
        if self.needs_fetch(request):
            with self._lock:
                # Re-check: a caller that held the lock may have fetched already.
                if self.needs_fetch(request):
                    self._refetch()
        return self._state.answer(request)

    def load(self) -> KeySet:
        """Fetch now, e.g. at start-up to fail fast.

        Raises:
            KeysUnavailable: the fetch failed (the cache keeps its last good key set).
        """
        with self._lock:
            return _loaded(self._state, self._refetch())

    def _refetch(self) -> Exception | None:
        now = self._clock()
        try:
            outcome: Jwks | Exception = self._fetch()
        except Exception as err:
            outcome = err
        return self._state.record(now, outcome)


class AsyncJwksCache(_CacheFront):
    """Asyncio JWKS cache; one fetch at a time. Arguments as for :class:`JwksCache`, with
    ``fetch`` a coroutine function such as ``AsyncTokenClient(...).get_keys``."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Jwks]],
        *,
        min_refetch_interval: float = DEFAULT_MIN_REFETCH_INTERVAL,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(min_refetch_interval, retry_interval, clock)
        self._fetch = fetch
        self._lock = asyncio.Lock()

    async def answer(self, request: KeyRequest = CURRENT) -> KeySet | None:
        """Answer ``request``, fetching first if the rules call for it."""
        if self.needs_fetch(request):
            async with self._lock:
                if self.needs_fetch(request):
                    await self._refetch()
        return self._state.answer(request)

    async def load(self) -> KeySet:
        """Fetch now. Raises ``KeysUnavailable`` if that fails."""
        async with self._lock:
            return _loaded(self._state, await self._refetch())

    async def _refetch(self) -> Exception | None:
        now = self._clock()
        try:
            outcome: Jwks | Exception = await self._fetch()
        except Exception as err:
            outcome = err
        return self._state.record(now, outcome)
