"""`tokensvc serve` as processes: one owner per address and per data directory, workers
that die with their parent, a SIGTERM under load that cancels nothing, start-up errors
that are one line and exit 2."""

from __future__ import annotations

import collections
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.support import wait_until
from tests.support.processes import Serve, failed_start
from tokensvc.keys.ring import load_kek
from tokensvc.redis.embedded import free_port
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc


def _issue_loop(target: str, stop: threading.Event, codes: collections.Counter[str]) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        while not stop.is_set():
            try:
                stub.Issue(pb.IssueRequest(subject="load"), timeout=5)
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
                time.sleep(0.005)


def test_one_owner_per_address_and_data_dir_and_a_clean_sigterm_under_load(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    listen = ("--insecure", "--listen", f"127.0.0.1:{port}")
    first = Serve(*listen, "--data-dir", str(data), "--rate-issue", "off")
    try:
        first.wait_listening()
        # another serve on the same address: refused, whatever its data directory
        other = tmp_path / "other"
        line = failed_start("--insecure", "--listen", f"127.0.0.1:{port}", "--data-dir", str(other))
        assert "address in use" in line
        # another address on the same data directory: its embedded Redis is taken
        line = failed_start("--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(data))
        assert "in use by another process" in line
        assert (data / "redis" / "redis.sock").is_socket()  # never unlinked by the loser

        codes: collections.Counter[str] = collections.Counter()
        stop = threading.Event()
        target = f"127.0.0.1:{port}"
        threads = [
            threading.Thread(target=_issue_loop, args=(target, stop, codes)) for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: codes["OK"] >= 50, 20, what="50 Issues served under load")
        assert first.stop() == 0
        stop.set()
        for thread in threads:
            thread.join(10)
    finally:
        first.stop()
    # in-flight calls completed, later ones were refused UNAVAILABLE: nothing CANCELLED
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert "Traceback" not in first.errors()


def test_workers_exit_when_their_parent_is_killed(tmp_path, redis_url):
    port = free_port()
    serve = Serve(
        "--insecure",
        "--workers",
        "2",
        "--listen",
        f"127.0.0.1:{port}",
        "--redis-url",
        redis_url,
        "--data-dir",
        str(tmp_path / "data"),
    )
    try:
        serve.wait_listening(count=2)
        workers = _workers_of(serve.proc.pid)
        assert len(workers) == 2, workers
        serve.proc.kill()  # SIGKILL: no chance to forward anything
        serve.proc.wait(5)
        wait_until(
            lambda: not any(_alive(pid) for pid in workers),
            30,
            what="the workers to die with their parent",
            interval=0.1,
        )
    finally:
        serve.stop()


def _workers_of(parent: int) -> list[int]:
    """The worker processes (multiprocessing spawn children, not its resource tracker)."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    workers = []
    for pid in map(int, children.stdout.split()):
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"spawn_main" in cmdline.read():
                workers.append(pid)
    return workers


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


class _NotRedis:
    """A loopback TCP server answering like an HTTP server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def test_start_up_errors_are_one_line_and_exit_2(tmp_path, redis_url, dev_pki):
    base = ("--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    junk = _NotRedis()
    line = failed_start(*base, "--redis-url", f"redis://127.0.0.1:{junk.port}/0")
    assert f"127.0.0.1:{junk.port}" in line and "does not answer as Redis" in line
    junk.sock.close()

    closed = free_port()
    line = failed_start(*base, "--redis-url", f"redis://127.0.0.1:{closed}/0")
    assert f"127.0.0.1:{closed}" in line and ("refused" in line or "failed" in line)

    # the default multi-worker TLS mode with a key of another certificate: one line, and
    # the embedded Redis the parent started is gone again
    data = tmp_path / "tls"
    line = failed_start(
        "--workers",
        "2",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--tls-cert",
        str(dev_pki["server"].cert),
        "--tls-key",
        str(dev_pki["login"].key),
        "--data-dir",
        str(data),
    )
    assert "does not belong to certificate" in line
    assert not (data / "redis" / "redis.sock").exists()
    assert not _redis_serving(data / "redis")


def _redis_serving(directory: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", f"redis-server.*{directory}"], capture_output=True)
    return found.returncode == 0


def test_concurrent_starts_create_exactly_one_development_kek(tmp_path):
    """Workers (or replicas on one data directory) racing for the development KEK all
    end up with the same key."""
    barrier = threading.Barrier(8)
    keys: list[str] = []

    def load() -> None:
        barrier.wait()
        keys.append(load_kek(None, tmp_path).thumbprint())

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8 and len(set(keys)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["dev-kek.json"]
    assert (tmp_path / "dev-kek.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_kek_file_readable_by_others_is_warned_about(tmp_path, caplog, mode):
    kek = tmp_path / "kek.json"
    load_kek(None, tmp_path)  # writes a valid one to copy
    kek.write_text((tmp_path / "dev-kek.json").read_text())
    kek.chmod(mode)
    with caplog.at_level("WARNING", logger="tokensvc.keyring"):
        load_kek(kek, tmp_path)
    assert any("readable by" in r.getMessage() for r in caplog.records)


def test_too_few_replicas_for_redis_wait_replicas_is_a_loud_warning(
    make_settings, start_server, caplog
):
    """A single Redis has no replica to WAIT for: every Revoke would fail, so the start-up
    says so (and keeps serving: Revokes work again once replicas connect)."""
    with caplog.at_level("ERROR", logger="tokensvc.startup"):
        server = start_server(make_settings(redis_wait_replicas=1, redis_wait_timeout=0.1))
    (record,) = [r for r in caplog.records if r.name == "tokensvc.startup"]
    assert "--redis-wait-replicas 1" in record.getMessage()
    assert "0 connected replica" in record.getMessage()
    stub = server.stub()
    # Issue waits for the replicas too: issue the session through a server without WAIT
    pair = start_server(make_settings()).stub().Issue(pb.IssueRequest(subject="alice")).tokens
    with pytest.raises(grpc.RpcError) as err:
        stub.Revoke(pb.RevokeRequest(session_id=pair.session_id))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
