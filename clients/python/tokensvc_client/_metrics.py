"""The client library's figures as OpenTelemetry metrics, when the host service has an
OpenTelemetry SDK configured -- at no cost on the call path either way.

The interceptors, the verifier's cache, the JWKS caches and the revocation feeds keep plain
integer counters (an increment per call is all the call path pays). This module exposes them
as *observable* instruments on the global meter provider (``opentelemetry.metrics``), so
they are read only when the host's SDK collects. Without the SDK the API's provider never
collects; without ``opentelemetry-api`` installed (it is not a dependency of the base
client) nothing is registered at all.

Instruments (Prometheus names once exported through the SDK's Prometheus reader):

* ``tokensvc.client.calls`` {outcome=allowed|refused, reason} -- interceptor decisions
  (``tokensvc_client_calls_total``); ``reason`` is the stable reason code of a refusal.
* ``tokensvc.client.token_cache.hits`` / ``.misses`` -- the verifier's verified-token cache.
* ``tokensvc.client.jwks.fetches`` / ``.failures`` -- JWK Set fetches (GetKeys or HTTPS).
* ``tokensvc.client.feed.connected``, ``.stale`` (0/1), ``.reconnects``, ``.events`` and
  ``.last_event.age`` (seconds since the feed last heard an event, or since it started).

Several interceptors or feeds in one process are summed (counters), or reported by their
worst value (connected: the least, stale and age: the largest). Each source is held weakly.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

try:
    from opentelemetry import metrics as _otel
except ImportError:  # the base client runs without OpenTelemetry
    _otel = None  # type: ignore[assignment]

SCOPE = "tokensvc_client"

_lock = threading.Lock()
_sources: dict[str, weakref.WeakSet[Any]] = {
    "auth": weakref.WeakSet(),
    "verifier": weakref.WeakSet(),
    "jwks": weakref.WeakSet(),
    "feed": weakref.WeakSet(),
}
_registered = False


def track(kind: str, source: object) -> None:
    """Report ``source``'s counters (``kind``: auth, verifier, jwks or feed)."""
    if _otel is None:
        return
    with _lock:
        _sources[kind].add(source)
        _register_once()


def _live(kind: str) -> list[Any]:
    with _lock:
        return list(_sources[kind])


def _register_once() -> None:
    global _registered
    if _registered or _otel is None:
        return
    _registered = True
    register(_otel.get_meter(SCOPE))


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
        sources = _live("auth")
        if not sources:
            return
        yield Observation(sum(a.allowed for a in sources), {"outcome": "allowed", "reason": ""})
        refused: dict[str, int] = {}
        for auth in sources:
            for reason, n in list(auth.refused.items()):
                refused[reason] = refused.get(reason, 0) + n
        for reason, n in refused.items():
            yield Observation(n, {"outcome": "refused", "reason": reason})

    def total(kind: str, attribute: str) -> Callable[[], Iterable[Any]]:
        def read() -> Iterable[Any]:
            sources = _live(kind)
            if sources:
                yield Observation(sum(getattr(s, attribute) for s in sources))

        return read

    def feeds(
        read: Callable[[Any], float], pick: Callable[[list[float]], float]
    ) -> Callable[[], Iterable[Any]]:
        def observe() -> Iterable[Any]:
            values = [read(core) for core in _live("feed")]
            if values:
                yield Observation(pick(values))

        return observe

    def age(core: Any) -> float:
        return time.monotonic() - float(core.last_event_at or core.started_at)

    counter("calls", "{call}", "Interceptor decisions by outcome and reason", calls)
    counter("token_cache.hits", "{token}", "Verified-token cache hits", total("verifier", "hits"))
    counter(
        "token_cache.misses", "{token}", "Verified-token cache misses", total("verifier", "misses")
    )
    counter("jwks.fetches", "{fetch}", "JWK Set fetches", total("jwks", "fetches"))
    counter("jwks.failures", "{fetch}", "Failed JWK Set fetches", total("jwks", "failures"))
    counter(
        "feed.reconnects",
        "{stream}",
        "Revocation feed reconnections",
        feeds(lambda c: max(0, c.streams - 1), sum),
    )
    counter("feed.events", "{event}", "Revocation events received", total("feed", "events"))
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
