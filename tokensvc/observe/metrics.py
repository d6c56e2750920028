"""Server metrics through the OpenTelemetry metrics API, exported as Prometheus text and/or
over OTLP.

One :class:`ServerMetrics` per running server, on a meter provider of its own:

* **Prometheus**: when the server has an HTTP listener (``--http-listen``, or
  ``--metrics-listen`` for a plain one), a ``PrometheusMetricReader``
  (``opentelemetry-exporter-prometheus``) renders ``/metrics`` from a registry of its own.
* **OTLP and others**: ``OTEL_METRICS_EXPORTER`` (a comma list: ``otlp``, ``console``, ...)
  is read by the SDK's own configuration code, which also picks the OTLP protocol from
  ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL``/``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or
  ``http/protobuf``); each exporter pushes every ``OTEL_METRIC_EXPORT_INTERVAL`` ms.
  ``prometheus`` there is refused: the SDK's variant opens a port of its own on every
  interface; ``/metrics`` on our listener is the Prometheus endpoint.

With neither, :data:`DISABLED` (no-op instruments, no RPC interceptor, no callbacks) is
used: nothing is measured or exported. What is recorded (names per the OpenTelemetry
semantic conventions 1.44, ``rpc.server.call.duration``; Prometheus names in
docs/observability.md):

* the RPC duration histogram, by method and status code (:mod:`tokensvc.observe.rpc_metrics`);
* a counter per security event, derived from the audit trail's records at the one place
  they are made (:meth:`ServerMetrics.audit_event`), so the two always agree. Attributes
  are low-cardinality codes only -- never a subject, token, session id or jti;
* state gauges read at collection time (key ring, revocation feed, audit writer, Redis
  unavailability), from :class:`State`.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from opentelemetry.metrics import (
    Meter,
    NoOpMeterProvider,
    Observation,
)
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

log = logging.getLogger("tokensvc.metrics")

METRICS_PATH = "/metrics"
#: The text format every Prometheus version reads (what generate_latest writes)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
SCOPE = "tokensvc"
_LABEL = re.compile(r"[A-Za-z0-9_.\- ]{1,48}")


def label(value: str) -> str:
    """A code usable as an attribute value: short, plain; anything else is ``other``."""
    return value if _LABEL.fullmatch(value) else "other"


@dataclass
class State:
    """Where the state gauges read from; each is optional (``None``: not observed)."""

    keyring: Any = None  # tokensvc.keys.ring.KeyRing
    rotation_interval_s: float = 0.0
    hub: Any = None  # tokensvc.api.revocation_hub.RevocationHub
    audit: Any = None  # tokensvc.observe.audit.AuditTrail
    redis_errors: Counter[str] = field(default_factory=Counter)
    #: the server's TLS certificate file (its remaining life is a gauge)
    tls_cert: Path | None = None
    #: Redis commands retried because their Cluster slot was moving, by error kind
    slot_retries: Counter[str] = field(default_factory=Counter)


def certificate_seconds_left(path: Path, now: float) -> float | None:
    """Seconds until the first certificate of a PEM file expires (``None``: unreadable)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp() - now


_IDENTITY_REASONS = (
    ("URI SANs", "several_uri_sans"),
    ("not a valid SPIFFE ID", "invalid_spiffe_id"),
    ("is a CA", "ca_certificate"),
    ("unreadable", "unreadable"),
)


def _identity_reason(text: str) -> str:
    """The code of a certificate refusal (its text names the certificate)."""
    return next((code for words, code in _IDENTITY_REASONS if words in text), "other")


class ServerMetrics:
    """The server's instruments on one meter (a no-op one when nothing is exported)."""

    def __init__(
        self,
        meter: Meter,
        *,
        enabled: bool = True,
        client_ids: bool = False,
        provider: SdkMeterProvider | None = None,
        render: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        self.enabled = enabled
        self.client_ids = client_ids
        self.provider = provider
        self.render = render  # Prometheus text of /metrics, when there is a listener
        self.rpc_duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of incoming RPCs (OpenTelemetry RPC semconv 1.44)",
            explicit_bucket_boundaries_advisory=[
                *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
                *(0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            ],
        )

        def counter(name: str, unit: str, description: str) -> Any:
            return meter.create_counter(f"tokensvc.{name}", unit=unit, description=description)

        self.issued = counter("tokens.issued", "{token}", "Token pairs issued")
        self.refreshed = counter("tokens.refreshed", "{token}", "Refresh tokens rotated")
        self.replays = counter(
            "tokens.refresh_replays", "{token}", "Rotated refresh tokens replayed in grace"
        )
        self.reuse = counter(
            "tokens.reuse_detections",
            "{family}",
            "Replays of a rotated refresh token (the family was revoked)",
        )
        self.revocations = counter("revocations", "{revocation}", "Revocations by target kind")
        self.auth_failures = counter(
            "auth.failures", "{call}", "Failed authentications by RPC and reason code"
        )
        self.denials = counter("policy.denials", "{call}", "Calls refused by the caller policy")
        self.rate_limited = counter(
            "rate_limit.refusals", "{call}", "Calls refused by a rate limit, by limit"
        )
        self.locks = counter("subjects.locks", "{subject}", "LockSubject calls")
        self.unlocks = counter("subjects.unlocks", "{subject}", "UnlockSubject calls")
        self.identity_refusals = counter(
            "identity.refusals", "{certificate}", "Client certificates refused as identities"
        )
        self.rotations = counter("keys.rotations", "{rotation}", "Key rotations by kind")
        self.retirements = counter("keys.retirements", "{key}", "Pending keys retired")
        self.exchanged = counter(
            "tokens.exchanged", "{token}", "Access tokens exchanged (RFC 8693), by kind"
        )
        self.txn_minted = counter(
            "txn_tokens.minted", "{token}", "Transaction Tokens minted, replacements apart"
        )
        self.exchange_denials = counter(
            "exchange.denials", "{call}", "Exchanges and mints refused by the exchange policy"
        )
        self.suppressed = counter(
            "audit.suppressed",
            "{call}",
            "Refused calls not audited one by one (their peer was over a limit), by event",
        )
        self.events: dict[str, Callable[[Mapping[str, str]], None]] = {
            "issued": self._on_issued,
            "refreshed": lambda f: self.refreshed.add(1),
            "refresh_replayed": lambda f: self.replays.add(1),
            "reuse_detected": lambda f: self.reuse.add(1),
            "revoked": lambda f: self.revocations.add(1, {"target": label(f.get("target", ""))}),
            "auth_failed": self._on_auth_failed,
            # a certificate_mismatch, audited as a security event: the same series
            "bound_token_misuse": self._on_auth_failed,
            "denied": self._on_denied,
            "rate_limited": lambda f: self.rate_limited.add(
                1, {"limit": label(f.get("reason", ""))}
            ),
            "locked": lambda f: self.locks.add(1),
            "unlocked": lambda f: self.unlocks.add(1),
            "identity_refused": lambda f: self.identity_refusals.add(
                1, {"reason": _identity_reason(f.get("reason", ""))}
            ),
            "keys_rotated": lambda f: self.rotations.add(1, {"kind": label(f.get("reason", ""))}),
            "key_retired": lambda f: self.retirements.add(1),
            "exchanged": lambda f: self.exchanged.add(
                1, {"kind": "impersonation" if f.get("impersonated") == "1" else "delegation"}
            ),
            "txn_token_minted": lambda f: self.txn_minted.add(
                1, {"replacement": f.get("replaced") == "1"}
            ),
            "exchange_denied": lambda f: self.exchange_denials.add(
                1, {"rpc": label(f.get("rpc", ""))}
            ),
            "suppressed": lambda f: self.suppressed.add(
                int(f.get("calls", "0") or 0), {"event": label(f.get("reason", ""))}
            ),
        }
        self._meter = meter
        if enabled:  # counters without attributes start at 0: the first event is an increase
            for instrument in (self.refreshed, self.replays, self.reuse, self.locks):
                instrument.add(0)

    # -- events --------------------------------------------------------------------------

    def audit_event(self, event: str, fields: Mapping[str, str]) -> None:
        """Count one audit record (called by :meth:`tokensvc.observe.audit.AuditTrail.record`)."""
        if self.enabled:
            handler = self.events.get(event)
            if handler is not None:
                handler(fields)

    def _on_issued(self, fields: Mapping[str, str]) -> None:
        attributes = {"bound": fields.get("bound", "0") == "1"}
        if self.client_ids:
            attributes["client_id"] = label(fields.get("client_id", "") or "none")  # type: ignore[assignment]
        self.issued.add(1, attributes)

    def _on_auth_failed(self, fields: Mapping[str, str]) -> None:
        # the refusal's code (tokensvc.errors.AuthFailure), never the reason's prose
        rpc, code = label(fields.get("rpc", "")), label(fields.get("code", ""))
        self.auth_failures.add(1, {"rpc": rpc, "reason": code})

    def _on_denied(self, fields: Mapping[str, str]) -> None:
        # tokensvc.errors.Denial: a locked subject is the subject's state; every other
        # refusal of an identified caller is counted as the policy's
        rpc, code = label(fields.get("rpc", "")), fields.get("code", "")
        reason = "subject_locked" if code == "subject_locked" else "policy"
        self.denials.add(1, {"rpc": rpc, "reason": reason})

    # -- state gauges --------------------------------------------------------------------

    def observe(self, state: State, clock: Callable[[], float] = time.time) -> None:
        """Register the state gauges (read when a reader collects)."""
        if not self.enabled:
            return
        meter = self._meter

        def gauge(
            name: str, unit: str, description: str, read: Callable[[], Iterable[Observation]]
        ) -> None:
            meter.create_observable_gauge(
                f"tokensvc.{name}", [lambda _o: list(read())], unit=unit, description=description
            )

        def total(
            name: str, unit: str, description: str, read: Callable[[], Iterable[Observation]]
        ) -> None:
            meter.create_observable_counter(
                f"tokensvc.{name}", [lambda _o: list(read())], unit=unit, description=description
            )

        if state.keyring is not None:
            ring, interval = state.keyring, state.rotation_interval_s

            def keys() -> Iterable[Observation]:
                states = Counter(r.get("state", "") for r in ring.records.values())
                for name in ("pending", "active", "retired"):
                    yield Observation(states.get(name, 0), {"state": name})

            def active(due: bool) -> Iterable[Observation]:
                for record in ring.records.values():
                    since = record.get("activated_ms")
                    if record.get("state") == "active" and since:
                        age = clock() - since / 1000
                        yield Observation(interval - age if due else age)

            gauge("keys", "{key}", "Signing keys by state", keys)
            gauge("keys.active.age", "s", "Age of the active signing key", lambda: active(False))
            gauge(
                "keys.rotation.due",
                "s",
                "Seconds until the next scheduled rotation (negative: overdue)",
                lambda: active(True),
            )

        def value(read: Callable[[], float]) -> Callable[[], Iterable[Observation]]:
            return lambda: [Observation(read())]

        hub, audit = state.hub, state.audit
        if hub is not None:
            gauge("feed.watchers", "{stream}", "Open WatchRevocations streams",
                  value(lambda: hub.watcher_count))  # fmt: skip
            total("feed.events.sent", "{event}", "Revocation events sent to watchers",
                  value(lambda: hub.sent))  # fmt: skip
            gauge("feed.events.held", "{event}", "Revocations in force held for new watchers",
                  value(lambda: hub.held))  # fmt: skip
            total("feed.resyncs", "{resync}",
                  "Times the revocation stream lost history and the feed was rebuilt",
                  value(lambda: hub.resyncs))  # fmt: skip
        if audit is not None:
            gauge("audit.queue.depth", "{record}", "Audit records waiting for Redis",
                  value(lambda: audit.pending))  # fmt: skip
            total("audit.dropped", "{record}", "Audit records dropped (queue full)",
                  value(lambda: audit.dropped))  # fmt: skip
            total("audit.write_failures", "{batch}", "Failed audit stream writes",
                  value(lambda: audit.write_failures))  # fmt: skip
        if state.tls_cert is not None:
            cert_path = state.tls_cert

            def certificate() -> Iterable[Observation]:
                left = certificate_seconds_left(cert_path, clock())
                return [] if left is None else [Observation(left)]

            gauge(
                "tls.certificate.remaining",
                "s",
                "Seconds until the TLS certificate file (--tls-cert) expires",
                certificate,
            )
        errors = state.redis_errors
        total(
            "redis.unavailable",
            "{error}",
            "Redis calls that failed as unavailable, by error kind",
            lambda: [Observation(n, {"kind": kind}) for kind, n in errors.items()],
        )
        retries = state.slot_retries
        total(
            "redis.slot_retries",
            "{retry}",
            "Redis commands sent again because their Cluster slot was moving (they had not run)",
            lambda: [Observation(n, {"kind": kind}) for kind, n in retries.items()],
        )


def observe_listeners(metrics: ServerMetrics, gates: Iterable[Any]) -> None:
    """Connections the HTTP listeners hold and refuse (``tokensvc.http.gate.Gate``s): a
    climbing refusal count means a client is at its connection cap."""
    live = [gate for gate in gates if gate is not None]
    if not metrics.enabled or not live:
        return
    meter = metrics._meter
    meter.create_observable_gauge(
        "tokensvc.http.connections",
        [lambda _o: [Observation(sum(g.connections for g in live))]],
        unit="{connection}",
        description="Connections the HTTP listeners hold (handshaking or served)",
    )
    meter.create_observable_counter(
        "tokensvc.http.refused",
        [lambda _o: [Observation(sum(g.refused for g in live))]],
        unit="{connection}",
        description="Connections closed at accept: a client at its cap, or all slots taken",
    )


DISABLED = ServerMetrics(NoOpMeterProvider().get_meter(SCOPE), enabled=False)


def _env_readers() -> list[MetricReader]:
    """Readers for ``OTEL_METRICS_EXPORTER``, through the SDK's own configuration code."""
    from opentelemetry.sdk._configuration import _get_exporter_names, _import_exporters

    names = [n for n in _get_exporter_names("metrics") if n != "none"]
    if "prometheus" in names:
        log.warning(
            "OTEL_METRICS_EXPORTER=prometheus is not used: scrape /metrics on --http-listen "
            "or --metrics-listen"
        )
        names.remove("prometheus")
    if not names:
        return []
    _, exporters, _ = _import_exporters([], names, [])
    readers: list[MetricReader] = []
    for cls in exporters.values():
        if issubclass(cls, MetricReader):
            readers.append(cls())
        else:
            readers.append(PeriodicExportingMetricReader(cls()))
    return readers


def setup(*, prometheus: bool, client_ids: bool = False) -> ServerMetrics:
    """The metrics of one server: :data:`DISABLED` unless something exports them.

    Raises:
        RuntimeError: ``OTEL_METRICS_EXPORTER`` names an exporter that is not installed
            (or an unsupported OTLP protocol).
    """
    readers = _env_readers()
    render = None
    if prometheus:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=registry))

        def render() -> tuple[bytes, str]:
            return generate_latest(registry), PROMETHEUS_TEXT

    if not readers:
        return DISABLED
    resource = _resource()
    # exemplars (trace ids on measurements) cost ~40 % of each measurement; only on request
    if os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER"):  # the SDK reads it
        provider = SdkMeterProvider(metric_readers=readers, resource=resource)
    else:
        provider = SdkMeterProvider(
            metric_readers=readers, resource=resource, exemplar_filter=AlwaysOffExemplarFilter()
        )
    return ServerMetrics(
        provider.get_meter(SCOPE), client_ids=client_ids, provider=provider, render=render
    )


def _resource() -> Resource:
    """``service.name`` and a ``service.instance.id`` per process (``<host>-<pid>``), so
    the series of the workers of one pod stay apart in OTLP; ``OTEL_RESOURCE_ATTRIBUTES``
    may set the id, which is then the operator's to keep unique per process."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "tokensvc")})
    if "service.instance.id" in resource.attributes:
        return resource
    instance = f"{socket.gethostname()}-{os.getpid()}"
    return resource.merge(Resource({"service.instance.id": instance}))


def shutdown(metrics: ServerMetrics) -> None:
    """Flush and stop the exporters (pushes a last OTLP batch)."""
    if metrics.provider is not None:
        metrics.provider.shutdown(timeout_millis=3000)
