"""Assemble and run the service: Redis (embedded or external), key ring, gRPC server with
health checking, reflection and tracing, and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace import TracerProvider

from tokensvc.api.decoding import DecodingGuard
from tokensvc.api.revocation_hub import RevocationHub
from tokensvc.api.servicer import TokenService
from tokensvc.config import Settings
from tokensvc.http.listener import Document, HttpJwks, start_http
from tokensvc.keys.backend import SigningUnavailable, pkcs11_backend
from tokensvc.keys.ring import KeyRing, Lifecycle, load_kek
from tokensvc.observe import metrics, rpc_metrics, tracing
from tokensvc.observe.audit import AuditTrail
from tokensvc.proc.tasks import cancelled_since, cancelling_count
from tokensvc.redis import connection
from tokensvc.redis.connection import RedisClient
from tokensvc.redis.embedded import RedisProcess
from tokensvc.redis.watchdog import Watchdog
from tokensvc.runtime.draining import Drain
from tokensvc.runtime.startup import check_redis, unavailable
from tokensvc.security.policy import CallerPolicy
from tokensvc.store import FamilyStore, StoreUnavailable
from tokensvc.store.calls import UNAVAILABLE
from tokensvc_client.v1 import tokensvc_pb2, tokensvc_pb2_grpc

log = logging.getLogger("tokensvc.server")
SERVICE_NAME = tokensvc_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
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
class Running:
    """A started service; ``port`` is the bound port (useful with ``--listen HOST:0``)."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    redis: RedisClient
    health: HealthServicer
    audit: AuditTrail
    embedded: RedisProcess | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    http: HttpJwks | None = None  # the --http-listen JWKS listener, if any
    tracer_provider: TracerProvider | None = None  # None: no spans, no instrumentation
    watching: asyncio.Task[None] | None = None  # the Redis watchdog: stops last
    metrics_http: HttpJwks | None = None  # the --metrics-listen listener, if any
    metrics: metrics.ServerMetrics = metrics.DISABLED
    drain: Drain = field(default_factory=Drain)

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
        # in-flight calls still audit: the audit writer (last task) stops after the server
        maintain, hub = self.tasks[0], self.tasks[1]
        hub.cancel()  # ends the feed streams
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
        maintain.cancel()
        self.tasks[-1].cancel()  # AuditTrail.run writes what is queued when cancelled
        await _finish(self.tasks)
        if self.watching is not None:
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


async def _maintain(keyring: KeyRing, lifecycle: Lifecycle, health: HealthServicer) -> None:
    """Each second: run the key ring's due transitions (which also picks up other replicas'
    changes and proves Redis reachable) and report readiness accordingly."""
    current = None
    baseline = cancelling_count()
    while not cancelled_since(baseline):  # a cancel redis-py swallowed (see tokensvc.observe.audit)
        await asyncio.sleep(_MAINTENANCE_INTERVAL)
        try:
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
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = RedisProcess(settings.data_dir / "redis", unix_socket=True, prefer_system=False)
        await asyncio.to_thread(embedded.start)
        url = embedded.url
        log.info("embedded redis-server started, data in %s", embedded.data_dir)
    # the Redis timeout is the watchdog's, per connection (no timer per command)
    watchdog = Watchdog(settings.redis_timeout)
    watching = asyncio.create_task(watchdog.run(), context=tracing.untraced())
    redis = redis_client(url, settings.redis_timeout, watchdog)
    server: grpc.aio.Server | None = None
    http = metrics_http = None
    try:
        policy = CallerPolicy.for_settings(settings)
        previous = (
            [load_kek(settings.previous_kek_file, settings.data_dir)]
            if settings.previous_kek_file
            else []
        )
        kek = load_kek(settings.kek_file, settings.data_dir)
        token = pkcs11_backend(settings)  # None unless --pkcs11-module
        keyring = KeyRing(redis, kek, previous, pkcs11=token, new_keys=settings.key_backend)
        await check_redis(redis, settings, url)
        await keyring.load()
        store = FamilyStore(
            redis,
            feed_ttl_ms=(settings.access_ttl + settings.leeway) * 1000,
            wait_replicas=settings.redis_wait_replicas,
            wait_timeout=settings.redis_wait_timeout,
        )
        await store.load_scripts()
        store.legacy_locks = await store.find_legacy_locks()
        # the feed reader blocks at most half the socket timeout, so it never times out
        hub = RevocationHub(
            redis,
            block_ms=max(100, int(settings.redis_timeout * 500)),
            max_per_client=settings.max_watchers_per_client,
        )
        await hub.prime()  # before any watcher can connect (see RevocationHub.prime)
        provider = tracing.setup_tracing(tracer_provider)
        meters = metrics.setup(
            # /metrics on --http-listen only with one worker (see below)
            prometheus=bool(
                settings.metrics_listen or (settings.http_listen and settings.workers == 1)
            ),
            client_ids=settings.metrics_client_ids,
        )

        drain = Drain()
        server = grpc.aio.server(
            # the drain first: a call refused during shutdown costs nothing else
            interceptors=[
                drain,
                *rpc_metrics.interceptors(meters),
                *tracing.server_interceptors(provider),
            ],
            options=[
                # only the workers of one `serve` share a port (tokensvc.proc.ownership makes
                # sure no other process serves it); a single process does not share it
                ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
                # transport caps below every field limit's sum (tokensvc.api.validation): oversized
                # messages or metadata are refused by gRPC before any of our code runs
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_metadata_size", _MAX_METADATA),
            ],
        )
        audit = AuditTrail(redis, log_routine=settings.audit_log_all)
        audit.metrics = meters
        meters.observe(
            metrics.State(keyring, settings.key_rotation_interval, hub, audit, UNAVAILABLE)
        )
        # registers every handler so that an undecodable request is INVALID_ARGUMENT
        registrar = cast(grpc.aio.Server, DecodingGuard(server))
        tokensvc_pb2_grpc.add_TokenServiceServicer_to_server(
            TokenService(settings, store, keyring, audit, policy, hub, clock=clock), registrar
        )
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, registrar)
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            registrar,
        )
        if settings.insecure:
            log.warning(
                "INSECURE development mode: serving PLAINTEXT on %s (loopback only); there are no "
                "caller identities, so the caller policy is NOT enforced",
                settings.listen,
            )
            port = server.add_insecure_port(settings.listen)
        else:
            port = server.add_secure_port(settings.listen, _server_credentials(settings))
        await server.start()
        documents = {}
        if meters.render is not None:
            documents[metrics.METRICS_PATH] = Document(meters.render)
        if settings.http_listen:
            # a scrape of the port the workers share reaches a random worker: its counters
            # would jump between the workers' values (see tokensvc.runtime.workers)
            shared = documents if settings.workers == 1 else {}
            if settings.workers > 1:
                log.info(
                    "%s is not served on --http-listen with %d workers: scrape each "
                    "worker's --metrics-listen port (PORT+i)",
                    metrics.METRICS_PATH,
                    settings.workers,
                )
            http = await start_http(settings, keyring, shared)
        if settings.metrics_listen:
            # each worker has a port of its own (tokensvc.runtime.workers.worker_settings)
            metrics_http = await start_http(
                settings, None, documents, settings.metrics_listen, shared=False
            )
    except BaseException as err:
        watching.cancel()
        if http is not None:
            await http.stop()
        if server is not None:
            await server.stop(None)
        await redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        if isinstance(err, StoreUnavailable):
            raise unavailable(err, url) from err
        raise
    running = Running(settings, server, port, redis, health, audit, embedded)
    running.drain = drain
    running.watching = watching
    running.http = http
    running.tracer_provider = provider
    running.http, running.metrics_http, running.metrics = http, metrics_http, meters
    metrics.observe_listeners(meters, [h.gate for h in (http, metrics_http) if h is not None])
    lifecycle = Lifecycle.from_settings(settings)
    for job in (_maintain(keyring, lifecycle, health), hub.run(), audit.run()):  # audit last
        running.tasks.append(asyncio.create_task(job, context=tracing.untraced()))
    log.info("tokensvc serving on port %d issuer=%s", port, settings.issuer)
    return running


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
