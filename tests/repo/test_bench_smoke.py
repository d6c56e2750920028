"""The benchmark in miniature, so it never rots: every row of every row module present and
sane, server CPU per request measured for the service rows (no timing assertions: the
machines are shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import rows_call_chains, service_rows
from bench.run import modules

ROOT = Path(__file__).resolve().parents[2]
#: rows measured against a server process: they carry its CPU per request
WITH_SERVER_CPU = [
    "limit.grpc_noop",
    *service_rows.ROWS,
    *rows_call_chains.SERVER_ROWS,
    "rpc.protected_noop",
    "rpc.unprotected_noop",
]


def test_quick_benchmark_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["cpus"] >= 1
    rows = results["rows"]
    for module in modules():
        for name in module.ROWS:
            assert rows[name]["rps"] > 0, name
    for name in WITH_SERVER_CPU:
        assert rows[name]["server_cpu_us"] > 0, name
        assert rows[name]["cpu_x_noop"] > 0, name
    assert rows["rpc.issue.workers_2"]["workers"] == 2
    # sizes and ratios are what `make bench` reports: here only that they are measured
    # (the family's size bound is tests/store/test_families_v2.py's; round trips per RPC
    # vary with the service's background commands on a busy machine)
    assert rows["store.family_bytes"]["bytes"] > 0
    for name in ("rpc.issue", "rpc.refresh", "rpc.introspect"):
        assert rows[name]["redis_roundtrips"] >= 1.0  # at least its one Lua script
    assert {t["row"] for t in results["targets"]} >= {"rpc.getkeys", "rpc.protected_noop"}
    assert "targets:" in proc.stdout
