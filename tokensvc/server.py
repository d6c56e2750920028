"""Assemble and run the service: Redis (embedded or external), key ring, gRPC server with
health checking, reflection and tracing, and graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
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

from tokensvc import metrics, metrics_rpc, redisconn, telemetry
from tokensvc.audit import AuditTrail
from tokensvc.config import Settings
from tokensvc.decoding import DecodingGuard
from tokensvc.embedded import RedisProcess
from tokensvc.feed import RevocationHub
from tokensvc.http_jwks import Document, HttpJwks, start_http
from tokensvc.keyring import KeyRing, Lifecycle, load_kek
from tokensvc.policy import CallerPolicy
from tokensvc.redisconn import RedisClient
from tokensvc.service import TokenService
from tokensvc.store import FamilyStore, StoreUnavailable
from tokensvc.store.calls import UNAVAILABLE
from tokensvc.tasks import cancelled_since, cancelling_count
from tokensvc_client.v1 import tokensvc_pb2, tokensvc_pb2_grpc

log = logging.getLogger("tokensvc.server")
SERVICE_NAME = tokensvc_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name
_MAINTENANCE_INTERVAL = 1.0
_MAX_MESSAGE = 64 * 1024
_MAX_METADATA = 16 * 1024


def redis_client(
    url: str, timeout: float, watchdog: redisconn.Watchdog | None = None
) -> RedisClient:
    """An asyncio client for any --redis-url topology (single server, Sentinel, Cluster)
    that never retries a command on its own (see tokensvc.redisconn)."""
    return redisconn.redis_client(url, timeout, watchdog)


def _server_credentials(settings: Settings) -> grpc.ServerCredentials:
    from tokensvc import tls  # TLS files reloaded on change, TLS 1.2+ (see tokensvc.tls)

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

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, finish in-flight ones within ``grace``, release Redis."""
        await self.health.enter_graceful_shutdown()
        for listener in (self.http, self.metrics_http):
            if listener is not None:
                await listener.stop()
        # in-flight calls still audit: the audit writer (last task) stops after the server
        for task in self.tasks[:-1]:
            task.cancel()
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
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
    while not cancelled_since(baseline):  # a cancel redis-py swallowed (see tokensvc.audit)
        await asyncio.sleep(_MAINTENANCE_INTERVAL)
        try:
            await keyring.tick(lifecycle)
            status = health_pb2.HealthCheckResponse.SERVING
        except StoreUnavailable:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
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
    """Start everything; raises on a configuration that cannot work (bad KEK, no Redis).
    ``clock``: the servicer's UNIX time (tests give a replica a skewed one)."""
    embedded = None
    url = settings.redis_url
    if url is None:
        embedded = RedisProcess(settings.data_dir / "redis", unix_socket=True, prefer_system=False)
        await asyncio.to_thread(embedded.start)
        url = embedded.url
        log.info("embedded redis-server started, data in %s", embedded.data_dir)
    # the Redis timeout is the watchdog's, per connection (no timer per command)
    watchdog = redisconn.Watchdog(settings.redis_timeout)
    watching = asyncio.create_task(watchdog.run(), context=telemetry.untraced())
    redis = redis_client(url, settings.redis_timeout, watchdog)
    try:
        policy = CallerPolicy.for_settings(settings)
        previous = (
            [load_kek(settings.previous_kek_file, settings.data_dir)]
            if settings.previous_kek_file
            else []
        )
        keyring = KeyRing(redis, load_kek(settings.kek_file, settings.data_dir), previous)
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
    except Exception:
        watching.cancel()
        await redis.aclose()
        if embedded is not None:
            embedded.stop()
        raise
    provider = telemetry.setup_tracing(tracer_provider)
    meters = metrics.setup(
        prometheus=bool(settings.http_listen or settings.metrics_listen),
        client_ids=settings.metrics_client_ids,
    )

    server = grpc.aio.server(
        interceptors=[*metrics_rpc.interceptors(meters), *telemetry.server_interceptors(provider)],
        # several worker processes bind the same port; the kernel spreads connections
        options=[
            ("grpc.so_reuseport", 1),
            # transport caps below every field limit's sum (tokensvc.limits): oversized
            # messages or metadata are refused by gRPC before any of our code runs
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_metadata_size", _MAX_METADATA),
        ],
    )
    audit = AuditTrail(redis, log_routine=settings.audit_log_all)
    audit.metrics = meters
    meters.observe(metrics.State(keyring, settings.key_rotation_interval, hub, audit, UNAVAILABLE))
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
    http = metrics_http = None
    try:
        if settings.http_listen:
            http = await start_http(settings, keyring, documents)
        if settings.metrics_listen:
            metrics_http = await start_http(settings, None, documents, settings.metrics_listen)
    except BaseException:
        watching.cancel()
        if http is not None:
            await http.stop()
        await server.stop(None)
        await redis.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
        raise
    running = Running(settings, server, port, redis, health, audit, embedded)
    running.watching = watching
    running.http = http
    running.tracer_provider = provider
    running.http, running.metrics_http, running.metrics = http, metrics_http, meters
    lifecycle = Lifecycle.from_settings(settings)
    for job in (_maintain(keyring, lifecycle, health), hub.run(), audit.run()):  # audit last
        running.tasks.append(asyncio.create_task(job, context=telemetry.untraced()))
    log.info("tokensvc serving on port %d issuer=%s", port, settings.issuer)
    return running


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    running = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    print(f"tokensvc listening on {settings.host}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls")
    await running.stop()


def _worker_main(settings: Settings) -> None:
    """Entry point of one worker process (multiprocessing, spawn)."""
    from tokensvc.cli import setup_logging

    setup_logging(settings.log_level)
    asyncio.run(serve(settings))


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` server processes on one port; forward SIGTERM/SIGINT.

    An embedded Redis, if any, is started once here and shared by the workers. Returns the
    worst exit code of the workers.
    """
    import multiprocessing

    embedded = None
    if settings.redis_url is None:
        embedded = RedisProcess(settings.data_dir / "redis", unix_socket=True, prefer_system=False)
        embedded.start()
        settings = dataclasses.replace(settings, redis_url=embedded.url)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(settings,), daemon=False)
        for _ in range(settings.workers)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for proc in procs:
        proc.join()
        codes.append(proc.exitcode or 0)
    if embedded is not None:
        embedded.stop()
    return max(codes)
