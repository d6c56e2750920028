"""The benchmark in miniature, so it never rots: every row present and sane (no timing
assertions: the machines are shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROWS = [
    "limit.ecdsa_sign",
    "limit.ecdsa_verify",
    "limit.grpc_noop",
    "rpc.issue",
    "rpc.refresh",
    "rpc.introspect",
    "rpc.getkeys",
    "rpc.issue.workers_n",
    "interceptor.cold",
    "interceptor.warm",
    "rpc.protected_noop",
    "rpc.unprotected_noop",
]


def test_quick_benchmark_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["cpus"] >= 1
    for name in ROWS:
        row = results["rows"][name]
        assert row["rps"] > 0
    for name in ("rpc.issue", "rpc.refresh", "rpc.introspect"):
        # one Lua script per RPC; MONITOR may also catch the service's periodic PING
        assert 1.0 <= results["rows"][name]["redis_roundtrips"] < 1.5
