"""The service as an operator runs it: `tokensvc serve` with an embedded Redis, health,
reflection, graceful shutdown on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import audit_entries, wait_until
from tests.support.topology import paused_scripts
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc


def _start(tmp_path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokensvc",
            "serve",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "data"),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, match.group(1)


def test_serve_with_embedded_redis_health_reflection_and_graceful_sigterm(tmp_path):
    proc, target = _start(tmp_path)
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tokensvc.v1.TokenService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(
                refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
            )
            names = {s.name for s in answer.list_services_response.service}
            assert {"tokensvc.v1.TokenService", "grpc.health.v1.Health"} <= names

            stub = pb_grpc.TokenServiceStub(channel)
            pair = stub.Issue(pb.IssueRequest(subject="alice"), timeout=5).tokens
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "Traceback" not in stderr, stderr[stderr.find("Traceback") - 300 :]
    assert pair.access_token not in stderr and pair.refresh_token not in stderr
    # the embedded redis-server stopped with the service
    socket = tmp_path / "data" / "redis" / "redis.sock"
    wait_until(lambda: not socket.exists(), 5, what="the embedded redis-server's socket gone")


def test_embedded_redis_persists_across_restarts(tmp_path):
    proc, target = _start(tmp_path)
    with grpc.insecure_channel(target) as channel:
        pair = (
            pb_grpc.TokenServiceStub(channel)
            .Issue(pb.IssueRequest(subject="alice"), timeout=5)
            .tokens
        )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0

    proc, target = _start(tmp_path)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            assert stub.Introspect(pb.IntrospectRequest(token=pair.access_token), timeout=5).active
            stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token), timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_sigterm_finishes_in_flight_calls(tmp_path, redis_url):
    """Writes are paused in Redis so an Issue is in flight when SIGTERM arrives; it must
    complete successfully and the process then exits 0."""
    proc, target = _start(tmp_path, "--redis-url", redis_url)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            warm = stub.Issue(pb.IssueRequest(subject="warm-up"), timeout=5).tokens
            # its audit record written: the only script the pause then holds is the Issue's
            audit_entries(
                redis_url,
                lambda entries: any(e.get("session_id") == warm.session_id for e in entries),
                what="the warm-up's audit record",
            )
            admin = redis.Redis.from_url(redis_url, decode_responses=True)
            admin.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
            future = stub.Issue.future(pb.IssueRequest(subject="alice"), timeout=10)
            wait_until(lambda: paused_scripts(admin), 5, what="the Issue waiting in Redis")
            admin.close()
            proc.send_signal(signal.SIGTERM)
            assert future.result().tokens.access_token
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _lines_until(
    proc: subprocess.Popen[str], marker: str, *, count: int, seconds: float
) -> list[str]:
    """Read output until ``count`` lines contain ``marker``; fail with the output so far."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while sum(marker in line for line in seen) < count:
        try:
            seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"no {count}x {marker!r} within {seconds}s: {seen}") from None
    return seen


def test_workers_share_one_port_and_one_key_ring(tmp_path):
    from tokensvc.redis.embedded import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokensvc",
            "serve",
            "--insecure",
            "--workers",
            "2",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        _lines_until(proc, f"listening on 127.0.0.1:{port}", count=2, seconds=60)
        jwks = set()
        for _ in range(6):  # new connections are spread over the workers by the kernel
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.TokenServiceStub(channel)
                jwks.add(stub.GetKeys(pb.GetKeysRequest(), timeout=5).jwks)
                pair = stub.Issue(pb.IssueRequest(subject="alice"), timeout=5).tokens
                assert stub.Introspect(
                    pb.IntrospectRequest(token=pair.access_token), timeout=5
                ).active
        assert len(jwks) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
