"""`tokensvc serve` as a subprocess, for the tests of processes, workers and their metrics."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time


class Serve:
    """A `tokensvc serve` subprocess; stdout lines are collected on a thread."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokensvc", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: [self.lines.put(x) for x in stdout], daemon=True).start()

    def wait_listening(self, count: int = 1, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        seen = 0
        while seen < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"not listening: {self.proc.stderr.read()}") from None
            seen += "listening on" in line

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def errors(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def failed_start(*args: str) -> str:
    """Run a `serve` that must not start: exit 2 and exactly one line on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    done = subprocess.run(
        [sys.executable, "-m", "tokensvc", "serve", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    lines = [line for line in done.stderr.splitlines() if not line.startswith('{"ts"')]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("tokensvc: "), done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def adjacent_free_ports() -> int:
    """A loopback port P with P+1 also free (each of two workers serves metrics on its own
    port: P, P+1), both bound for a moment to check."""
    from tokensvc.redis.embedded import free_port

    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two adjacent free ports")
