"""The tokensvc benchmark: limits of the machine, the service, the interceptor, Redis trips.

One run starts what it needs (a real redis-server, tokensvc and a no-op server as separate
processes on loopback), drives each with a closed-loop load generator (``LOAD_PROCS``
processes, ``CHANNELS`` connections each, ``CONCURRENCY`` calls in flight in all), prints a
table and writes ``bench/results.json``::

    {"cpus": N, "load": {...}, "rows": {NAME: {"rps", "p50_ms", "p99_ms", "server_cpu_us",
     "load_cpu_us", "us_per_op", "redis_roundtrips", ...}}, "targets": [...]}

``server_cpu_us`` is the CPU (from ``/proc/<pid>/task/*/schedstat``, see :mod:`bench.cpu`)
the server's processes used per request over the measured window; it is far steadier than
RPS on a shared machine. The no-op server (``limit.grpc_noop``) runs for the whole
benchmark and is loaded before and after every row that :meth:`Bench.measure` takes
(no-op, row, no-op, row, ...): each row's ``cpu_x_noop`` and ``rps_x_noop`` are ratios to
the mean of its two neighbouring no-op runs (``noop_cpu_us``, ``noop_rps``), so a burst of
other work on a shared machine moves both sides of a ratio alike; the targets read them.
``limit.grpc_noop`` itself is the median of every no-op run.

Rows come from modules: the core ones in ``MODULES``, then every ``bench/rows_*.py`` in name
order, so a new row is a new module and nothing else. A row module has::

    ROWS: tuple[str, ...]            # the rows it writes (the CI smoke test checks them)
    TARGETS: list[Target]            # optional: ratios the report checks
    def run(b: Bench) -> None: ...   # b.serve(...) starts tokensvc, b.load(...) drives it

``--quick`` runs a few hundred requests per row: the CI smoke test, so the benchmark never
rots. Figures are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.cpu import CpuMeter
from bench.loadgen import LoadResult, merge, run_load
from tokensvc.redis.embedded import RedisProcess, free_port

SERVICE = "/tokensvc.v1.TokenService/"
ISSUER = "https://bench.tokensvc"
AUDIENCE = "mesh"
ROOT = Path(__file__).resolve().parents[1]
#: The load shape of every measured row: processes, connections per process, calls in flight.
LOAD_PROCS = 2
CHANNELS = 4
CONCURRENCY = 32
MODULES = ("bench.limit_rows", "bench.service_rows", "bench.interceptor_rows")
NOOP_ROW = "limit.grpc_noop"
NOOP_METHOD = "/bench.Noop/Call"


@dataclass(frozen=True)
class Target:
    """``row.metric / base.metric`` must be ≥ ``at_least`` or ≤ ``at_most`` (or the row's own
    metric alone when ``base`` is empty)."""

    row: str
    base: str
    metric: str = "rps"
    at_least: float | None = None
    at_most: float | None = None


@dataclass
class Server:
    target: str
    pid: int


class Bench:
    def __init__(self, scale: float, redis_url: str, data_dir: Path) -> None:
        self.scale = scale
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.rows: dict[str, dict[str, float]] = {}
        self.targets: list[Target] = []
        self.ctx = multiprocessing.get_context("spawn")
        self.pool = self.ctx.Pool(LOAD_PROCS)
        self.step = 0
        #: the no-op server every row is interleaved with (see the module doc)
        self.noop: Server | None = None
        self.noop_runs: list[tuple[float, float]] = []  # (server µs per request, rps)
        self._last_noop: tuple[float, float] | None = None

    def n(self, count: int) -> int:
        return max(50, int(count * self.scale))

    def progress(self, name: str) -> None:
        self.step += 1
        print(f"[{self.step:2d}] {name} ...", file=sys.stderr, flush=True)

    # -- servers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self, *extra: str, workers: int = 1) -> Iterator[Server]:
        """A tokensvc on the bench's Redis (``extra``: more ``serve`` flags)."""
        port = free_port()
        args = [*tokensvc_args(port, self.redis_url, self.data_dir, workers), *extra]
        with process(args, "listening") as proc:
            if workers > 1:
                time.sleep(1.0)  # let every worker bind
            yield Server(f"127.0.0.1:{port}", proc.pid)

    # -- measurement helpers ---------------------------------------------------------

    def load(
        self,
        target: str,
        method: str,
        requests: list[bytes],
        *,
        server_pid: int | None = None,
        procs: int = LOAD_PROCS,
        **kw: Any,
    ) -> LoadResult:
        """Send ``requests`` from ``procs`` load processes at once; with ``server_pid``, also
        measure that process tree's CPU over the window (``result.server_cpu``)."""
        procs = max(1, min(procs, LOAD_PROCS, len(requests)))
        kw.setdefault("concurrency", CONCURRENCY)
        kw.setdefault("channels", CHANNELS)
        kw["concurrency"] = max(1, kw["concurrency"] // procs)
        kw["start_at"] = time.time() + 0.3 + 0.2 * procs  # after every process connected
        shards = [requests[i::procs] for i in range(procs)]
        pending = [self.pool.apply_async(run_load, (target, method, s), kw) for s in shards]
        meter = CpuMeter(server_pid) if server_pid else None
        if meter is not None:
            time.sleep(max(0.0, kw["start_at"] - time.time()))
            meter.start()
        result = merge([p.get(300) for p in pending])
        server_cpu = meter.stop() if meter is not None else 0.0
        if result.errors:
            raise RuntimeError(f"{method}: {result.errors} failed requests {result.error_codes}")
        result.server_cpu = server_cpu
        return result

    def record_load(self, name: str, result: LoadResult, **extra: float) -> None:
        lat = sorted(result.latencies)
        row = {
            "rps": round(len(lat) / result.seconds, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
            "load_cpu_us": round(result.cpu / len(lat) * 1e6, 1),
        }
        if result.server_cpu:
            row["server_cpu_us"] = round(result.server_cpu / len(lat) * 1e6, 1)
        self.rows[name] = {**row, **extra}

    def noop_round(self) -> tuple[float, float]:
        """Load the no-op server once with the standard shape: (server µs per request, rps)."""
        assert self.noop is not None
        result = self.load(
            self.noop.target, NOOP_METHOD, [b""] * self.n(4000), server_pid=self.noop.pid
        )
        count = len(result.latencies)
        run = (result.server_cpu / count * 1e6, count / result.seconds)
        self.noop_runs.append(run)
        return run

    def record_noop(self) -> None:
        """``limit.grpc_noop``: the median CPU and the median rps of every no-op run."""
        if not self.noop_runs:
            return
        middle = len(self.noop_runs) // 2
        cpu = sorted(c for c, _ in self.noop_runs)[middle]
        rps = sorted(r for _, r in self.noop_runs)[middle]
        row = {"rps": round(rps, 1), "server_cpu_us": round(cpu, 1), "runs": len(self.noop_runs)}
        self.rows = {NOOP_ROW: row, **{k: v for k, v in self.rows.items() if k != NOOP_ROW}}

    def measure(
        self, name: str, server: Server, method: str, requests: list[bytes], **kw: Any
    ) -> LoadResult:
        """Load a server with the standard shape and record row ``name`` with its CPU,
        between two no-op runs (the one before may be the previous row's one after)."""
        self.progress(name)
        before = self._last_noop if self._last_noop is not None else self.noop_round()
        result = self.load(server.target, SERVICE + method, requests, server_pid=server.pid, **kw)
        after = self._last_noop = self.noop_round()
        self.record_load(name, result)
        row = self.rows[name]
        noop_cpu, noop_rps = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
        row["noop_cpu_us"], row["noop_rps"] = round(noop_cpu, 1), round(noop_rps, 1)
        if row.get("server_cpu_us"):
            row["cpu_x_noop"] = round(row["server_cpu_us"] / noop_cpu, 2)
        row["rps_x_noop"] = round(row["rps"] / noop_rps, 2)
        return result

    def record_op(self, name: str, fn: Callable[[], object], count: int) -> None:
        """Time a function on one core: best of three batches, µs per op."""
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(count):
                fn()
            best = min(best, time.perf_counter() - start)
        us = best / count * 1e6
        self.rows[name] = {"us_per_op": round(us, 2), "rps": round(1e6 / us, 1)}


@contextlib.contextmanager
def process(
    args: list[str], ready: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while ready not in proc.stdout.readline():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[:4]} did not start")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def tokensvc_args(port: int, redis_url: str, data_dir: Path, workers: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tokensvc",
        "serve",
        "--insecure",
        "--listen",
        f"127.0.0.1:{port}",
        "--redis-url",
        redis_url,
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
        "--data-dir",
        str(data_dir),
        "--workers",
        str(workers),
        # the load sends thousands of Issues for one subject: a limit it never reaches keeps
        # the per-subject rate check (inside Issue's script) in the measured path
        "--rate-issue",
        "100000000/1",
    ]


def modules() -> list[ModuleType]:
    """The core row modules, then every ``bench/rows_*.py`` in name order."""
    names = list(MODULES)
    names += [f"bench.{p.stem}" for p in sorted((ROOT / "bench").glob("rows_*.py"))]
    return [importlib.import_module(name) for name in names]


#: ratios to the row's neighbouring no-op runs (see Bench.measure), by metric
_TO_NOOP = {"rps": "rps_x_noop", "server_cpu_us": "cpu_x_noop"}


def check(b: Bench, t: Target) -> tuple[str, float, bool] | None:
    row, base = b.rows.get(t.row), b.rows.get(t.base) if t.base else {t.metric: 1.0}
    if not row or not base or t.metric not in row or not base.get(t.metric):
        return None
    interleaved = _TO_NOOP.get(t.metric) if t.base == NOOP_ROW else None
    if interleaved and interleaved in row:
        value = row[interleaved]  # to the no-op runs just before and after the row
    else:
        value = row[t.metric] / base[t.metric]
    ok = (t.at_least is None or value >= t.at_least) and (t.at_most is None or value <= t.at_most)
    bound = f"≥ {t.at_least:g}" if t.at_least is not None else f"≤ {t.at_most:g}"
    what = f"{t.row} / {t.base}" if t.base else t.row
    return f"{what} {t.metric} = {value:.2f}  [{bound}]", value, ok


COLUMNS = (
    ("rps", "rps", 1),
    ("p50_ms", "p50 ms", 3),
    ("p99_ms", "p99 ms", 3),
    ("server_cpu_us", "srv µs/req", 1),
    ("cpu_x_noop", "x noop cpu", 2),
    ("rps_x_noop", "x noop rps", 2),
    ("load_cpu_us", "load µs/req", 1),
    ("us_per_op", "µs/op", 2),
    ("redis_roundtrips", "redis trips", 2),
)


def report(b: Bench) -> list[dict[str, Any]]:
    noop_cpu = b.rows.get(NOOP_ROW, {}).get("server_cpu_us")
    for row in b.rows.values():  # rows not interleaved: to the median no-op run
        if noop_cpu and "server_cpu_us" in row and "cpu_x_noop" not in row:
            row["cpu_x_noop"] = round(row["server_cpu_us"] / noop_cpu, 2)
    print(
        f"\ntokensvc benchmark — {os.cpu_count()} CPUs, {sys.platform}, Python {sys.version.split()[0]}"
    )
    print(f"load: {LOAD_PROCS} processes x {CHANNELS} connections, {CONCURRENCY} calls in flight")
    print(f"{'row':28}" + "".join(f" {title:>11}" for _, title, _ in COLUMNS))
    for name, row in b.rows.items():
        cells = [f"{row[k]:.{d}f}" if k in row else "" for k, _, d in COLUMNS]
        print(f"{name:28}" + "".join(f" {c:>11}" for c in cells))
    print("\ntargets:")
    checked = []
    for t in b.targets:
        outcome = check(b, t)
        if outcome is not None:
            line, value, ok = outcome
            print(f"  {line} {'ok' if ok else 'NOT MET'}")
            checked.append({**asdict(t), "value": round(value, 3), "met": ok})
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred requests per row (CI smoke)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--only", default="", help="run only row modules whose name contains this")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tokensvc-bench-") as tmp:
        redis_proc = RedisProcess(Path(tmp) / "redis").start()
        b = Bench(0.1 if args.quick else 1.0, redis_proc.url, Path(tmp) / "data")
        noop_port = free_port()
        noop_args = [sys.executable, "-m", "bench.noop_server", str(noop_port)]
        try:
            with process(noop_args, "ready") as noop:
                b.noop = Server(f"127.0.0.1:{noop_port}", noop.pid)
                for module in modules():
                    if args.only and args.only not in module.__name__:
                        continue
                    b.targets.extend(getattr(module, "TARGETS", ()))
                    module.run(b)
            b.record_noop()
        finally:
            redis_proc.stop()
            b.pool.close()
            b.pool.join()
    targets = report(b)
    load = {"processes": LOAD_PROCS, "channels": CHANNELS, "concurrency": CONCURRENCY}
    results = {"cpus": os.cpu_count(), "load": load, "rows": b.rows, "targets": targets}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0
