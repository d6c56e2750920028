"""One refresh per session, however many requests or tabs find its access token due.

Every request of a browser carries the same session cookie, so when the access token is
due, several requests (parallel fetches, several tabs) present the same refresh token at
once. Spending it more than once would be *reuse*, which tokensvc answers by revoking the
whole session. Inside one process of the web backend that never happens:

* **Single flight.** The first request to find the session due starts the Refresh; every
  other request of that session presenting the same refresh token waits for the same call
  and gets the same new pair. (A request with another of the session's refresh tokens --
  an old cookie, maybe stolen -- never joins: it is spent at tokensvc, which answers reuse.)
* **Spent-token memory.** Requests that started before the browser received the new
  cookie still carry the old one. For ``spent_token_memory`` seconds the refresh token
  just spent is remembered (as a hash) with the session's newest pair, and such requests
  get that pair instead of spending the old token again.

Across several processes or replicas of the web backend, nothing is shared: two of them
may refresh one session at the same moment. That is what tokensvc's refresh grace window
(``--refresh-grace-seconds``) is for: the refresh token just rotated, presented again
within the window before its successor has been used, gets the *same* successor refresh
token (with a fresh access token of the same session), so concurrent refreshes from
different replicas converge on one lineage and the family does not fork. Without a grace
window (strict mode) run one process per session (sticky sessions) or accept that the
loser of such a race logs the user out.

Memory is bounded: at most ``max_sessions`` remembered sessions, each kept for
``spent_token_memory`` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tokensvc_client.cache import BoundedCache
from tokensvc_client.results import TokenPair

__all__ = ["Refresher", "StoredSession"]

DEFAULT_MAX_SESSIONS = 100_000

K = TypeVar("K")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as the cookie holds it: the pair and when to refresh it."""

    tokens: TokenPair
    refresh_at: float

    @classmethod
    def of(cls, tokens: TokenPair, now: float, margin: float) -> StoredSession:
        """Refresh ``margin`` seconds before expiry, but not before half the remaining
        lifetime (so a short-lived token is not refreshed on every request)."""
        lifetime = max(0.0, tokens.access_expires_at - now)
        return cls(tokens, tokens.access_expires_at - min(margin, lifetime / 2))

    def due(self, now: float) -> bool:
        return now >= self.refresh_at


def _digest(refresh_token: str) -> bytes:
    return hashlib.sha256(refresh_token.encode("utf-8")).digest()


class Refresher:
    """Refreshes sessions through ``refresh`` (normally ``AsyncTokenClient.refresh``),
    once per session at a time; see the module docstring.

    Args:
        refresh: spends a refresh token for a new pair.
        margin: as for :meth:`StoredSession.of`.
        memory: seconds a spent refresh token is remembered.
        clock: epoch seconds.
        max_sessions: bound of the memory.
    """

    def __init__(
        self,
        refresh: Callable[[str], Awaitable[TokenPair]],
        *,
        margin: float,
        memory: float,
        clock: Callable[[], float],
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ) -> None:
        self._refresh = refresh
        self._margin = margin
        self._memory = memory
        self._clock = clock
        #: digest of the refresh token being spent -> its refresh under way
        self._flights: dict[bytes, asyncio.Future[StoredSession]] = {}
        # both oldest first, so in the order they are to be forgotten
        #: digest of a spent refresh token -> (session id, forget at)
        self._spent: BoundedCache[bytes, tuple[str, float]] = BoundedCache(max_sessions)
        #: session id -> (its newest session, forget at)
        self._latest: BoundedCache[str, tuple[StoredSession, float]] = BoundedCache(max_sessions)

    def newest(self, stored: StoredSession) -> StoredSession:
        """``stored``, or the session's newer pair if ``stored``'s refresh token was spent
        here within the memory time."""
        now = self._clock()
        self._forget(now)
        spent = self._spent.get(_digest(stored.tokens.refresh_token))
        if spent is None:
            return stored
        latest = self._latest.get(spent[0])
        return stored if latest is None else latest[0]

    async def refresh(self, stored: StoredSession) -> StoredSession:
        """The session refreshed once: joins a refresh of the same refresh token under way,
        or starts one. A cancelled caller does not cancel the refresh others wait for.

        Raises:
            TokenServiceError: the refresh failed (every waiter gets the same error).
        """
        key = _digest(stored.tokens.refresh_token)
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._run(stored))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)

    async def _run(self, stored: StoredSession) -> StoredSession:
        pair = await self._refresh(stored.tokens.refresh_token)
        now = self._clock()
        fresh = StoredSession.of(pair, now, self._margin)
        until = now + self._memory
        if self._memory > 0:
            self._spent.put(_digest(stored.tokens.refresh_token), (pair.session_id, until))
            self._latest.put(pair.session_id, (fresh, until))
        return fresh

    def _landed(self, key: bytes, done: asyncio.Future[StoredSession]) -> None:
        if self._flights.get(key) is done:
            del self._flights[key]
        if not done.cancelled():
            done.exception()  # retrieved: no "exception was never retrieved" warning

    def _forget(self, now: float) -> None:
        _forget_until(self._spent, now)
        _forget_until(self._latest, now)


def _forget_until(memory: BoundedCache[K, tuple[T, float]], now: float) -> None:
    """Drop the entries of ``memory`` (oldest first, "forget at" last) due by ``now``."""
    oldest = memory.oldest()
    while oldest is not None and oldest[1][1] <= now:
        memory.pop(oldest[0])
        oldest = memory.oldest()
