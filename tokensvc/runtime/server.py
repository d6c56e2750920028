"""Assemble and run the service: Redis (embedded or external), key ring, gRPC server with
health checking, reflection and tracing, and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.trace import TracerProvider

from tokensvc.api import decoding, reflection
from tokensvc.api.health import CappedHealth
from tokensvc.api.reflection import ReflectionGate, add_reflection
from tokensvc.api.revocation_hub import RevocationHub
from tokensvc.api.servicer import TokenService
from tokensvc.config import Rate, Settings
from tokensvc.handlers import MethodWrapper, Registrar
from tokensvc.http.listener import Document, HttpJwks, metrics_on_public_port, start_http
from tokensvc.keys.backend import SigningUnavailable, pkcs11_backend
from tokensvc.keys.ring import KeyRing, load_kek
from tokensvc.keys.rotation import Lifecycle
from tokensvc.observe import metrics, rpc_metrics, tracing
from tokensvc.observe.audit import AuditTrail
from tokensvc.proc.tasks import cancelled_since, cancelling_count
from tokensvc.redis import connection
from tokensvc.redis.connection import RedisClient
from tokensvc.redis.embedded import Keeper, RedisProcess
from tokensvc.redis.watchdog import Watchdog
from tokensvc.runtime.draining import Drain, stream_limits
from tokensvc.runtime.startup import check_redis, unavailable
from tokensvc.security.policy import CallerPolicy
from tokensvc.store import FamilyStore, StoreUnavailable
from tokensvc.store.calls import SLOT_RETRIES, UNAVAILABLE
from tokensvc_client.v1 import tokensvc_pb2, tokensvc_pb2_grpc

log = logging.getLogger("tokensvc.server")
SERVICE_NAME = tokensvc_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
#: The services the server registers (:func:`_add_services`).
_SERVICES = (
    tokensvc_pb2.DESCRIPTOR.services_by_name["TokenService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection.SERVICE,
)
_MAINTENANCE_INTERVAL = 1.0
_QUIET = 0.05  # no new call for this long: none is queued inside gRPC (see Running.stop)
_GOAWAY_DELAY = 0.2  # seconds for the GOAWAY to reach the clients (a round trip)
_STOP_GRACE = 1.0  # for the refused calls (held until the GOAWAY delay is over)
_MAX_MESSAGE = 64 * 1024
_MAX_METADATA = 16 * 1024


def redis_client(url: str, timeout: float, watchdog: Watchdog | None = None) -> RedisClient:
    """An asyncio client for any --redis-url topology (single server, Sentinel, Cluster)
    that never retries a command on its own (see tokensvc.redis.connection)."""
    return connection.redis_client(url, timeout, watchdog)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    from tokensvc.security import (
        tls,  # TLS files reloaded on change, TLS 1.2+ (see tokensvc.security.tls)
    )

    return tls.server_credentials(settings)


@dataclass
class Background:
    """The server's background tasks, by name (stopped in the order :meth:`Running.stop`
    needs: the feed first, the key ring's maintenance after the server, the audit writer
    last, the Redis watchdog after everything that uses Redis)."""

    maintain: asyncio.Task[None]  # key ring transitions and readiness, each second
    feed: asyncio.Task[None]  # the revocation hub's Redis reader
    audit: asyncio.Task[None]  # the audit trail's writer: in-flight calls still audit

    @classmethod
    def start(cls, keyring: KeyRing, settings: Settings, health: HealthServicer,
              hub: RevocationHub, audit: AuditTrail,
              embedded: RedisProcess | None = None) -> Background:  # fmt: skip
        def task(job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
            return asyncio.create_task(job, context=tracing.untraced())

        lifecycle = Lifecycle.from_settings(settings)
        keeper = Keeper(embedded) if embedded is not None else None
        maintain = _maintain(keyring, lifecycle, health, keeper)
        return cls(task(maintain), task(hub.run()), task(audit.run()))


@dataclass
class Running:
    """A started service; ``port`` is the bound port (useful with ``--listen HOST:0``)."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    redis: RedisClient
    health: HealthServicer
    audit: AuditTrail
    background: Background
    watching: asyncio.Task[None]  # the Redis watchdog: stops last
    drain: Drain
    embedded: RedisProcess | None = None
    http: HttpJwks | None = None  # the --http-listen JWKS listener, if any
    metrics_http: HttpJwks | None = None  # the --metrics-listen listener, if any
    tracer_provider: TracerProvider | None = None  # None: no spans, no instrumentation
    metrics: metrics.ServerMetrics = metrics.DISABLED

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, finish in-flight ones within ``grace``, release Redis.

        New calls get UNAVAILABLE while the ones in flight finish, and nothing is ended
        CANCELLED (see :mod:`tokensvc.runtime.draining`); revocation feed streams end at once
        (UNAVAILABLE: the watchers resume from their last id elsewhere)."""
        grace = self.settings.grace_seconds if grace is None else grace
        self.drain.start()
        await self.health.enter_graceful_shutdown()
        for listener in (self.http, self.metrics_http):
            if listener is not None:
                await listener.stop()
        tasks = self.background
        tasks.feed.cancel()  # ends the feed streams
        if not await self.drain.wait_idle(grace):
            log.warning("calls still in flight after %.1f s of grace: cancelling them", grace)
        # calls still queued inside gRPC would be CANCELLED by the stop: wait for a quiet
        # moment; the refused calls wait until gRPC has sent every client its GOAWAY, so a
        # client retrying at once opens a new connection (refused: UNAVAILABLE) instead of
        # sending a call into the closing one
        await self.drain.wait_quiet(_QUIET, timeout=grace)
        stopping = asyncio.create_task(self.server.stop(_STOP_GRACE))
        if self.drain.held:
            await asyncio.sleep(_GOAWAY_DELAY)
        self.drain.release()
        await stopping
        tasks.maintain.cancel()
        tasks.audit.cancel()  # AuditTrail.run writes what is queued when cancelled
        await _finish([tasks.maintain, tasks.feed, tasks.audit])
        self.watching.cancel()
        await _finish([self.watching])
        await self.redis.aclose()
        await asyncio.to_thread(metrics.shutdown, self.metrics)
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for cancelled tasks, cancelling again those still running: redis-py under
    Python 3.11 can lose a cancellation that lands while a command is in flight."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(20):
        if not pending:
            return
        _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in pending:
            task.cancel()
    log.warning("%d background task(s) did not stop", len(pending))


async def _maintain(
    keyring: KeyRing, lifecycle: Lifecycle, health: HealthServicer, keeper: Keeper | None
) -> None:
    """Each second: restart the embedded Redis if it died (we own it), run the key ring's
    due transitions (which also picks up other replicas' changes and proves Redis
    reachable) and report readiness accordingly."""
    current = None
    baseline = cancelling_count()
    # a cancel redis-py swallowed ends the loop too (see tokensvc.observe.audit_writer)
    while not cancelled_since(baseline):
        await asyncio.sleep(_MAINTENANCE_INTERVAL)
        try:
            if keeper is not None:
                await asyncio.to_thread(keeper.check)
            await keyring.tick(lifecycle)
            status = health_pb2.HealthCheckResponse.SERVING
        except StoreUnavailable:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        except SigningUnavailable as err:  # the signing key's token: logged on each change
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            if status != current:
                log.error("NOT_SERVING: cannot sign: %s", err)
        except Exception:
            log.exception("maintenance step failed")
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        if status != current:
            current = status
            for name in ("", SERVICE_NAME):
                await health.set(name, status)
    raise asyncio.CancelledError


# -- assembly: each step builds one part, and registers its undoing on the exit stack --------


@dataclass
class _Redis:
    """The Redis side: its URL, the client, its watchdog and an embedded server if any."""

    url: str
    client: RedisClient
    watching: asyncio.Task[None]
    embedded: RedisProcess | None


async def _open_redis(settings: Settings, undo: contextlib.AsyncExitStack) -> _Redis:
    """Start the embedded redis-server (without --redis-url), the watchdog and the client."""
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = RedisProcess(settings.data_dir / "redis", unix_socket=True, prefer_system=False)
        await asyncio.to_thread(embedded.start)
        undo.push_async_callback(asyncio.to_thread, embedded.stop)
        url = embedded.url
        log.info("embedded redis-server started, data in %s", embedded.data_dir)
    # the Redis timeout is the watchdog's, per connection (no timer per command)
    watchdog = Watchdog(settings.redis_timeout)
    watching = asyncio.create_task(watchdog.run(), context=tracing.untraced())
    undo.callback(watching.cancel)
    client = redis_client(url, settings.redis_timeout, watchdog)
    undo.push_async_callback(client.aclose)
    return _Redis(url, client, watching, embedded)


def _per_period(rate: Rate) -> tuple[int, float] | None:
    """A rate as (burst, seconds to earn one more); None when it is off."""
    return (rate.count, rate.period / rate.count) if rate.enabled else None


@dataclass
class _Domain:
    """What the servicer works on: the caller policy, key ring, family store, feed hub."""

    policy: CallerPolicy
    keyring: KeyRing
    store: FamilyStore
    hub: RevocationHub


async def _build_domain(settings: Settings, redis: _Redis) -> _Domain:
    """Read the policy and the KEKs, prove Redis reachable, load the key ring and the
    store's scripts, and prime the revocation hub (before any watcher can connect)."""
    policy = CallerPolicy.for_settings(settings)
    previous = settings.previous_kek_file
    keyring = KeyRing(
        redis.client,
        load_kek(settings.kek_file, settings.data_dir),
        [load_kek(previous, settings.data_dir)] if previous else [],
        pkcs11=pkcs11_backend(settings),  # None unless --pkcs11-module
        new_keys=settings.key_backend,
    )
    await check_redis(redis.client, settings, redis.url)
    await keyring.load()
    store = FamilyStore(
        redis.client,
        feed_ttl_ms=(settings.access_ttl + settings.leeway) * 1000,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout=settings.redis_wait_timeout,
    )
    await store.load_scripts()
    store.legacy_locks = await store.find_legacy_locks()
    # the feed reader blocks at most half the socket timeout, so it never times out
    hub = RevocationHub(
        redis.client,
        block_ms=max(100, int(settings.redis_timeout * 500)),
        max_per_client=settings.max_watchers_per_client,
        feed_ttl_ms=store.feed_ttl_ms,
        full_catch_ups=_per_period(settings.rate_full_catch_ups),
    )
    await hub.prime()  # see RevocationHub.prime
    return _Domain(policy, keyring, store, hub)


def _grpc_server(settings: Settings, provider: TracerProvider | None) -> grpc.aio.Server:
    """The gRPC server with its transport caps and, when traces are exported, the tracing
    interceptor (not yet serving). The drain and the RPC metrics wrap each handler once at
    registration instead (:func:`_add_services`)."""
    return grpc.aio.server(
        interceptors=tracing.server_interceptors(provider, _SERVICES),
        options=[
            # only the workers of one `serve` share a port (tokensvc.proc.ownership makes
            # sure no other process serves it); a single process does not share it
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
            # transport caps below every field limit's sum (tokensvc.api.validation): oversized
            # messages or metadata are refused by gRPC before any of our code runs
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_metadata_size", _MAX_METADATA),
            *stream_limits(settings),
        ],
    )


async def _add_services(
    server: grpc.aio.Server,
    service: TokenService,
    reflection_gate: ReflectionGate,
    settings: Settings,
    wrappers: list[MethodWrapper],
) -> HealthServicer:
    """Register the token service, health (SERVING; Watch capped per client) and
    reflection, every handler wrapped once by ``wrappers`` (outermost last) inside the
    decoding guard (an undecodable request is INVALID_ARGUMENT); returns the health
    servicer."""
    registrar = cast(grpc.aio.Server, Registrar(server, [decoding.guarded, *wrappers]))
    tokensvc_pb2_grpc.add_TokenServiceServicer_to_server(service, registrar)
    health = CappedHealth(settings)
    health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    add_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
        registrar,
        reflection_gate,
    )
    return health


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Bind --listen (TLS, or plaintext in development mode); returns the port."""
    if settings.insecure:
        log.warning(
            "INSECURE development mode: serving PLAINTEXT on %s (loopback only); there are no "
            "caller identities, so the caller policy is NOT enforced",
            settings.listen,
        )
        return server.add_insecure_port(settings.listen)
    return server.add_secure_port(settings.listen, _server_credentials(settings))


async def _start_listeners(
    settings: Settings,
    keyring: KeyRing,
    meters: metrics.ServerMetrics,
    undo: contextlib.AsyncExitStack,
) -> tuple[HttpJwks | None, HttpJwks | None]:
    """The --http-listen JWKS listener and the --metrics-listen one, each if configured."""
    http = metrics_http = None
    documents = {}
    if meters.render is not None:
        documents[metrics.METRICS_PATH] = Document(meters.render)
    if settings.http_listen:
        # not with --metrics-listen (the operator's port), nor with workers: a scrape of the
        # port they share reaches a random worker (see tokensvc.http.listener)
        shared = documents if metrics_on_public_port(settings) else {}
        if settings.workers > 1:
            log.info(
                "%s is not served on --http-listen with %d workers: scrape each "
                "worker's --metrics-listen port (PORT+i)",
                metrics.METRICS_PATH,
                settings.workers,
            )
        http = await start_http(settings, keyring, shared)
        undo.push_async_callback(http.stop)
    if settings.metrics_listen:
        # each worker has a port of its own (tokensvc.runtime.workers.worker_settings)
        metrics_http = await start_http(
            settings, None, documents, settings.metrics_listen, shared=False
        )
        undo.push_async_callback(metrics_http.stop)
    return http, metrics_http


def _setup_metrics(settings: Settings) -> metrics.ServerMetrics:
    """/metrics on --http-listen only with one worker (see :func:`_start_listeners`)."""
    return metrics.setup(
        prometheus=bool(settings.metrics_listen) or metrics_on_public_port(settings),
        client_ids=settings.metrics_client_ids,
    )


async def start(
    settings: Settings,
    tracer_provider: TracerProvider | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Running:
    """Start everything; nothing is left running when it raises.
    ``clock``: the servicer's UNIX time (tests give a replica a skewed one).

    Raises:
        StartupError: a configuration that cannot work (no Redis, too few replicas).
        KeyRingError: a bad key-encryption key.
        ConfigError: unusable TLS files or policy.
    """
    async with contextlib.AsyncExitStack() as undo:
        redis = await _open_redis(settings, undo)
        try:
            running = await _assemble(settings, redis, undo, tracer_provider, clock)
        except StoreUnavailable as err:
            raise unavailable(err, redis.url) from err
        undo.pop_all()  # started: from here on, Running.stop undoes it
    log.info("tokensvc serving on port %d issuer=%s", running.port, settings.issuer)
    return running


async def _assemble(
    settings: Settings,
    redis: _Redis,
    undo: contextlib.AsyncExitStack,
    tracer_provider: TracerProvider | None,
    clock: Callable[[], float],
) -> Running:
    """Build and start everything on the Redis side, in order (see :func:`start`)."""
    domain = await _build_domain(settings, redis)
    provider = tracing.setup_tracing(tracer_provider)
    meters = _setup_metrics(settings)
    drain = Drain()
    server = _grpc_server(settings, provider)
    undo.push_async_callback(server.stop, None)
    audit = AuditTrail(redis.client, log_routine=settings.audit_log_all)
    audit.metrics = meters
    meters.observe(
        metrics.State(
            domain.keyring,
            settings.key_rotation_interval,
            domain.hub,
            audit,
            UNAVAILABLE,
            tls_cert=None if settings.insecure else settings.tls_cert,
            slot_retries=SLOT_RETRIES,
        )
    )
    service = TokenService(
        settings, domain.store, domain.keyring, audit, domain.policy, domain.hub, clock=clock
    )
    # the drain outermost: a call refused during shutdown runs none of our other code
    wrappers = [*rpc_metrics.wrappers(meters), drain.wrapper]
    gate = ReflectionGate(settings, domain.policy)
    health = await _add_services(server, service, gate, settings, wrappers)
    port = _bind(server, settings)
    await server.start()
    http, metrics_http = await _start_listeners(settings, domain.keyring, meters, undo)
    metrics.observe_listeners(meters, [h.gate for h in (http, metrics_http) if h is not None])
    background = Background.start(
        domain.keyring, settings, health, domain.hub, audit, redis.embedded
    )
    return Running(
        settings, server, port, redis.client, health, audit, background, redis.watching, drain,
        redis.embedded, http, metrics_http, provider, meters,
    )  # fmt: skip


def run(settings: Settings, *, parent_sentinel: int | None = None) -> None:
    """:func:`serve` on uvloop where it is installed (a dependency on Linux), else -- or
    with ``--no-uvloop`` -- on asyncio's own loop. uvloop's loop costs less per wake-up
    and per socket call; it pays once the Redis path is lean (docs/performance.md)."""
    factory = None
    if not settings.no_uvloop:
        try:
            import uvloop  # optional: not on every platform
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(settings, parent_sentinel=parent_sentinel))


async def serve(settings: Settings, *, parent_sentinel: int | None = None) -> None:
    """Run until SIGTERM or SIGINT (a worker also until its parent has exited, which makes
    ``parent_sentinel`` readable), then shut down gracefully.

    Raises:
        StartupError, KeyRingError, ConfigError: the service could not start.
    """
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if parent_sentinel is not None:
        loop.add_reader(parent_sentinel, stop.set)
    print(f"tokensvc listening on {settings.host}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls")
    await running.stop()
