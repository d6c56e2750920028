"""The client library's figures as OpenTelemetry metrics, when the host service has an
OpenTelemetry SDK configured -- at no cost on the call path either way.

The interceptors, the verifier's cache, the JWKS caches and the revocation feeds add to the
process-wide plain integers of :data:`TOTALS` (an increment per call is all the call path
pays, and counters stay monotonic however many interceptors come and go). This module
exposes them, and the feeds' state, as *observable* instruments on the global meter
provider (``opentelemetry.metrics``), so they are read only when the host's SDK collects.
Without the SDK the API's provider never collects; without ``opentelemetry-api`` installed
(it is not a dependency of the base client) nothing is registered at all.

Instruments (Prometheus names once exported through the SDK's Prometheus reader):

* ``tokensvc.client.calls`` {outcome=allowed|refused, reason} -- interceptor decisions
  (``tokensvc_client_calls_total``); ``reason`` is the stable reason code of a refusal.
* ``tokensvc.client.token_cache.hits`` / ``.misses`` -- the verifier's verified-token cache.
* ``tokensvc.client.jwks.fetches`` / ``.failures`` -- JWK Set fetches (GetKeys or HTTPS).
* ``tokensvc.client.feed.connected``, ``.stale`` (0/1), ``.reconnects``, ``.events`` and
  ``.last_event.age`` (seconds since the feed last heard an event, or since it started).

Several interceptors or feeds in one process are summed (counters), or reported by their
worst value (connected: the least, stale and age: the largest). Feeds are held weakly.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

try:
    from opentelemetry import metrics as _otel
except ImportError:  # the base client runs without OpenTelemetry
    _otel = None  # type: ignore[assignment]

SCOPE = "tokensvc_client"


class Totals:
    """Process-wide counts (read by the observable counters)."""

    def __init__(self) -> None:
        self.allowed = 0
        self.refused: Counter[str] = Counter()  # by reason code
        self.hits = 0  # verified-token cache
        self.misses = 0
        self.fetches = 0  # JWK Set
        self.fetch_failures = 0
        self.feed_events = 0
        self.feed_reconnects = 0


TOTALS = Totals()
_lock = threading.Lock()
_feeds: weakref.WeakSet[Any] = weakref.WeakSet()


def track_feed(core: object) -> None:
    """Report a revocation feed's state (held weakly)."""
    if _otel is not None:
        with _lock:
            _feeds.add(core)


def _live_feeds() -> list[Any]:
    with _lock:
        return list(_feeds)


def register(meter: Any) -> None:
    """Create the observable instruments on ``meter`` (the global provider's, normally)."""
    assert _otel is not None
    Observation = _otel.Observation

    def counter(name: str, unit: str, text: str, read: Callable[[], Iterable[Any]]) -> None:
        meter.create_observable_counter(
            f"tokensvc.client.{name}", [lambda _o: list(read())], unit=unit, description=text
        )

    def gauge(name: str, unit: str, text: str, read: Callable[[], Iterable[Any]]) -> None:
        meter.create_observable_gauge(
            f"tokensvc.client.{name}", [lambda _o: list(read())], unit=unit, description=text
        )

    def calls() -> Iterable[Any]:
        yield Observation(TOTALS.allowed, {"outcome": "allowed", "reason": ""})
        for reason, n in list(TOTALS.refused.items()):
            yield Observation(n, {"outcome": "refused", "reason": reason})

    def total(attribute: str) -> Callable[[], Iterable[Any]]:
        return lambda: [Observation(getattr(TOTALS, attribute))]

    def feeds(
        read: Callable[[Any], float], pick: Callable[[list[float]], float]
    ) -> Callable[[], Iterable[Any]]:
        def observe() -> Iterable[Any]:
            values = [read(core) for core in _live_feeds()]
            if values:
                yield Observation(pick(values))

        return observe

    def age(core: Any) -> float:
        return time.monotonic() - float(core.last_event_at or core.started_at)

    counter("calls", "{call}", "Interceptor decisions by outcome and reason", calls)
    counter("token_cache.hits", "{token}", "Verified-token cache hits", total("hits"))
    counter("token_cache.misses", "{token}", "Verified-token cache misses", total("misses"))
    counter("jwks.fetches", "{fetch}", "JWK Set fetches", total("fetches"))
    counter("jwks.failures", "{fetch}", "Failed JWK Set fetches", total("fetch_failures"))
    counter(
        "feed.reconnects", "{stream}", "Revocation feed reconnections", total("feed_reconnects")
    )
    counter("feed.events", "{event}", "Revocation events received", total("feed_events"))
    gauge(
        "feed.connected",
        "{state}",
        "Revocation feed connected (1) or not (0)",
        feeds(lambda c: float(c.connected), min),
    )
    gauge(
        "feed.stale",
        "{state}",
        "Revocation feed down longer than max_staleness (1) or not (0)",
        feeds(lambda c: float(c.stale()), max),
    )
    gauge(
        "feed.last_event.age",
        "s",
        "Seconds since the revocation feed last heard an event",
        feeds(age, max),
    )


if _otel is not None:
    register(_otel.get_meter(SCOPE))
