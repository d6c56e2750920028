"""Test support: a real tokensvc server running on its own event loop in a thread.

Sync tests talk to it with ordinary grpc channels; asyncio tests with grpc.aio channels in
their own loop. Nothing is mocked: real Redis, real gRPC over loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
import redis
from opentelemetry.sdk.trace import TracerProvider

from tests.support.waiting import TIME_FACTOR as TIME_FACTOR
from tests.support.waiting import scaled as scaled
from tests.support.waiting import wait_until as wait_until
from tests.support.waiting import wait_until_async as wait_until_async
from tokensvc.cli.devcerts import Issued
from tokensvc.config import Settings
from tokensvc.families.tokens import SubjectTags
from tokensvc.keys.ring import KeyRing, load_kek
from tokensvc.observe.audit_writer import AUDIT_STREAM
from tokensvc.redis.connection import redis_client
from tokensvc.runtime import server
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2_grpc

T = TypeVar("T")


class ServerThread:
    """Runs ``tokensvc.runtime.server.start`` on a private event loop."""

    def __init__(
        self,
        settings: Settings,
        tracer_provider: TracerProvider | None = None,
        clock: Any = None,
    ) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        extra = {"clock": clock} if clock is not None else {}
        self.running: server.Running = self.run(server.start(settings, tracer_provider, **extra))
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def stub(self) -> tokensvc_pb2_grpc.TokenServiceStub:
        return tokensvc_pb2_grpc.TokenServiceStub(self.channel())

    def stop(self, grace: float = 0.5) -> None:
        if self.loop.is_closed():
            return  # stopped already (by the test, then by the fixture)
        try:
            self.run(self.running.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def subject_tags(settings: Settings) -> SubjectTags:
    """The subject tags of the deployment ``settings`` runs (its keyed secret, read from its
    Redis under its KEK): tests compare the feed's and Redis's tags with them."""

    async def load() -> SubjectTags:
        assert settings.redis_url is not None
        redis = redis_client(settings.redis_url, 5.0)
        try:
            ring = KeyRing(redis, load_kek(settings.kek_file, settings.data_dir))
            await ring.load()
            return SubjectTags(ring.secret("subject-tag"))
        finally:
            await redis.aclose()

    return asyncio.run(load())


def settings_for(default_redis_url: str, data_dir: Any, **overrides: Any) -> Settings:
    """Loopback plaintext settings for tests; ``overrides`` replace any field."""
    base = Settings(
        listen="127.0.0.1:0",
        redis_url=overrides.pop("redis_url", default_redis_url),
        issuer="https://tokensvc.test",
        audience=("mesh",),
        insecure=True,
        data_dir=data_dir,
        redis_timeout=1.0,
        grace_seconds=0.5,
    )
    return dataclasses.replace(base, **overrides).validate()


class MtlsService:
    """A tokensvc over mTLS with a caller policy; stubs per workload certificate."""

    def __init__(self, server: ServerThread, pki: dict[str, Issued]) -> None:
        self.server = server
        self.pki = pki
        self.target = f"127.0.0.1:{server.port}"
        self._channels: list[grpc.Channel] = []

    def stub(self, workload: str | None) -> tokensvc_pb2_grpc.TokenServiceStub:
        """A stub presenting ``workload``'s certificate (None: TLS without one)."""
        ca = self.pki["server"].ca
        if workload is None:
            chan = channel(self.target, ca=ca)
        else:
            mine = self.pki[workload]
            chan = channel(self.target, ca=ca, cert=mine.cert, key=mine.key)
        self._channels.append(chan)
        return tokensvc_pb2_grpc.TokenServiceStub(chan)

    def close(self) -> None:
        for chan in self._channels:
            chan.close()


def until_available(call: Callable[[], T], timeout: float = 15.0) -> T:
    """``call()``'s result once it stops failing UNAVAILABLE (Redis restarting, a failover
    in progress); any other error is raised at once."""

    def attempt() -> tuple[T] | None:
        try:
            return (call(),)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return None

    return wait_until(attempt, timeout, what="the call to stop failing UNAVAILABLE")[0]


def audit_entries(
    redis_url: str,
    done: Callable[[list[dict[str, str]]], bool],
    what: str = "the audit events",
    timeout: float = 10.0,
) -> list[dict[str, str]]:
    """The audit stream's entries (decoded fields, oldest first) once ``done(entries)``
    holds: the server writes its audit trail in batches, after the answer."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def ready() -> list[dict[str, str]] | None:
        entries = [fields for _id, fields in client.xrange(AUDIT_STREAM)]
        return entries if done(entries) else None

    try:
        return wait_until(ready, timeout, what=what, interval=0.05)
    finally:
        client.close()


def events_of(entries: list[dict[str, str]]) -> list[str]:
    """The ``event`` field of each audit entry."""
    return [entry.get("event", "") for entry in entries]
