"""Failures explained where the operator looks: a dead embedded Redis is restarted by its
owner with one ERROR line, and a Redis that comes back empty is a WARNING that every session
is gone, not an INFO about a first key."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from tests.support import wait_until
from tests.support.processes import Serve
from tokensvc.keys.ring import KeyRing, load_kek
from tokensvc.redis.embedded import Keeper, RedisProcess, free_port, socket_path
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc


def _load(url: str, ring: KeyRing | None, tmp_path: Path) -> KeyRing:
    async def run() -> KeyRing:
        client = aioredis.Redis.from_url(url)
        mine = ring or KeyRing(client, load_kek(None, tmp_path))
        mine._redis = client  # a new event loop: a new client for the same ring
        try:
            await mine.load()
        finally:
            await client.aclose()
        return mine

    return asyncio.run(run())


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_first_key_on_a_fresh_redis_is_news_not_a_warning(redis_url, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tokensvc.keyring"):
        _load(redis_url, None, tmp_path)
    assert any("created the first signing key" in m for m in _messages(caplog, logging.INFO))
    assert not [m for m in _messages(caplog, logging.WARNING) if "key ring" in m]


def test_a_redis_that_lost_its_data_under_a_running_service_is_a_warning(
    redis_url, tmp_path, caplog
):
    ring = _load(redis_url, None, tmp_path)
    redis.Redis.from_url(redis_url).flushall()  # Redis restarted without its data
    with caplog.at_level(logging.INFO, logger="tokensvc.keyring"):
        _load(redis_url, ring, tmp_path)
    (warning,) = [m for m in _messages(caplog, logging.WARNING) if "key ring" in m]
    assert "lost its data" in warning and "every session" in warning


def test_an_empty_key_ring_beside_a_deployments_audit_trail_is_a_warning(
    redis_url, tmp_path, caplog
):
    redis.Redis.from_url(redis_url).xadd("ts:audit", {"event": "issued"})  # a deployment's
    with caplog.at_level(logging.INFO, logger="tokensvc.keyring"):
        _load(redis_url, None, tmp_path)
    assert any("lost its data" in m for m in _messages(caplog, logging.WARNING))


def test_a_dead_embedded_redis_is_restarted_with_one_error_line(tmp_path, caplog):
    proc = RedisProcess(tmp_path / "r", unix_socket=True, prefer_system=False).start()
    keeper = Keeper(proc)
    try:
        keeper.check()  # alive: nothing to do
        assert keeper.restarts == 0
        assert proc.process is not None
        proc.process.kill()  # killed from outside (OOM killer, an operator's kill -9)
        wait_until(lambda: proc.exit_code() is not None, what="redis-server to die")
        with caplog.at_level(logging.WARNING, logger="tokensvc.embedded"):
            keeper.check()
        assert keeper.restarts == 1
        assert redis.Redis.from_url(proc.url).ping()
        (error,) = _messages(caplog, logging.ERROR)
        assert "embedded redis-server" in error and "exited with code" in error
        assert str(proc.data_dir) in error and "restarting" in error
        assert any("restarted" in m for m in _messages(caplog, logging.WARNING))
    finally:
        proc.stop()
    keeper.check()  # stopped on purpose: not restarted
    assert proc.process is None and keeper.restarts == 1


def test_serve_restarts_its_embedded_redis_and_serves_again(tmp_path):
    """Through a real `tokensvc serve`: its embedded Redis is SIGKILLed; the service says so
    in one ERROR line, restarts it, and answers again with the same key ring."""
    data = tmp_path / "data"
    target = f"127.0.0.1:{free_port()}"
    serve = Serve("--insecure", "--listen", target, "--data-dir", str(data))
    try:
        serve.wait_listening()
        stub = pb_grpc.TokenServiceStub(grpc.insecure_channel(target))
        jwks = stub.GetKeys(pb.GetKeysRequest(), timeout=10).jwks
        url = f"unix://{socket_path(data.resolve() / 'redis')}"
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)

        def issues() -> bool:
            try:
                return bool(stub.Issue(pb.IssueRequest(subject="a"), timeout=5).tokens.session_id)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                return False

        wait_until(issues, timeout=30, what="Issue after the restart")
        assert int(redis.Redis.from_url(url).info("server")["process_id"]) != pid
        assert stub.GetKeys(pb.GetKeysRequest(), timeout=10).jwks == jwks  # from the AOF
    finally:
        serve.stop()
    logs = [json.loads(x) for x in serve.errors().splitlines() if x.startswith("{")]
    (died,) = [r for r in logs if r["level"] == "ERROR" and "exited" in r["msg"]]
    assert "embedded redis-server" in died["msg"] and "restarting" in died["msg"]
    assert any("restarted" in r["msg"] for r in logs if r["level"] == "WARNING")


def test_the_embedded_redis_dies_with_a_killed_serve(tmp_path):
    """SIGKILL leaves tokensvc no time to stop its Redis: the kernel's parent-death signal
    does (set by setpriv, no Python code between fork and exec)."""
    data = tmp_path / "data"
    serve = Serve("--insecure", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data))
    try:
        serve.wait_listening()
        url = f"unix://{socket_path(data.resolve() / 'redis')}"
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        serve.proc.kill()
        serve.proc.wait(timeout=20)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(gone, timeout=20, what="the embedded redis-server to die with serve")
    finally:
        serve.stop()
