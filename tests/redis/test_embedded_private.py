"""The embedded Redis is private to the user running tokensvc: a Unix socket only (never
an unauthenticated TCP port, however deep the data directory), a 0700 data directory,
0600 files, and a development KEK whose mode is checked like ``--kek-file``'s.

Real redis-server processes and a real ``tokensvc serve``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.support.processes import Serve
from tokensvc.keys.ring import load_kek
from tokensvc.proc.ownership import runtime_directory
from tokensvc.redis.embedded import RedisProcess


def _deep(base: Path) -> Path:
    """A data directory whose ``redis.sock`` would not fit ``AF_UNIX`` (~107 bytes)."""
    deep = base / ("d" * 60) / ("e" * 60)
    assert len(str(deep / "redis.sock")) > 108
    return deep


def _assert_private(directory: Path) -> None:
    """``directory`` is 0700 and everything in it is 0600 (directories 0700)."""
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    for path in directory.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode == 0o700, path
        elif not path.is_socket():
            assert mode & 0o077 == 0, f"{path} is {mode:o}"


def _config(url: str, name: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.config_get(name)[name])
    finally:
        client.close()


def test_a_deep_data_directory_gets_a_private_socket_never_tcp(tmp_path):
    proc = RedisProcess(_deep(tmp_path) / "redis", unix_socket=True, prefer_system=True)
    proc.start()
    try:
        assert proc.url.startswith("unix://"), proc.url
        assert len(os.fsencode(proc.socket_path)) < 108
        # in this user's checked runtime directory
        assert proc.socket_path.parent == runtime_directory()
        info = proc.socket_path.parent.lstat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
        assert _config(proc.url, "port") == "0"  # no TCP listener at all
        assert _config(proc.url, "unixsocketperm") == "700"
        assert redis.Redis.from_url(proc.url).ping()
    finally:
        proc.stop()
    assert not proc.socket_path.exists()


def test_data_files_are_private_even_those_of_an_older_start(tmp_path):
    data = tmp_path / "redis"
    (data / "appendonlydir").mkdir(parents=True)
    data.chmod(0o755)
    (data / "appendonlydir").chmod(0o755)
    old = data / "appendonlydir" / "old.aof"
    old.write_text("")
    old.chmod(0o644)
    proc = RedisProcess(data, unix_socket=True, prefer_system=True).start()
    try:
        client = redis.Redis.from_url(proc.url)
        client.set("k", "v")
        client.config_set("appendfsync", "always")
        client.set("k2", "v")
        client.close()
        deadline = time.monotonic() + 10  # the AOF of this start exists
        while not any(p.suffix == ".aof" and p != old for p in data.rglob("*")):
            assert time.monotonic() < deadline, list(data.rglob("*"))
            time.sleep(0.05)
        _assert_private(data)
    finally:
        proc.stop()


def test_serve_with_a_deep_data_directory_keeps_redis_to_itself(tmp_path):
    data = _deep(tmp_path)
    serve = Serve("--insecure", "--listen", "127.0.0.1:0", "--data-dir", str(data))
    try:
        serve.wait_listening()
        assert not (data / "redis" / "redis.sock").exists()
        sockets = [p for p in runtime_directory().iterdir() if p.is_socket()]
        found = [p for p in sockets if _config(f"unix://{p}", "dir") == str(data / "redis")]
        assert len(found) == 1, sockets
        assert _config(f"unix://{found[0]}", "port") == "0"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700  # created by serve
        _assert_private(data / "redis")
        assert stat.S_IMODE((data / "dev-kek.json").stat().st_mode) == 0o600
        # the CLI finds the same socket
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tokensvc",
                "audit",
                "tail",
                "--data-dir",
                str(data),
                "-o",
                "json",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert all(json.loads(line) for line in done.stdout.splitlines())
    finally:
        assert serve.stop() == 0
    assert not found[0].exists()
    assert "Traceback" not in serve.errors()


def test_a_development_kek_readable_by_others_is_warned_about(tmp_path, caplog):
    load_kek(None, tmp_path)
    kek = tmp_path / "dev-kek.json"
    assert stat.S_IMODE(tmp_path.stat().st_mode) != 0 and kek.stat().st_mode & 0o077 == 0
    kek.chmod(0o644)
    with caplog.at_level("WARNING", logger="tokensvc.keyring"):
        load_kek(None, tmp_path)
    assert any("readable by group or others" in r.getMessage() for r in caplog.records)


def test_a_new_data_directory_is_0700(tmp_path):
    load_kek(None, tmp_path / "fresh")
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
