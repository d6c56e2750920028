"""The tokensvc benchmark: limits of the machine, the service, the interceptor, Redis trips.

One run starts what it needs (a real redis-server, tokensvc and a no-op server as separate
processes on loopback), drives each with a closed-loop load generator in another process
(concurrency 32), prints a table and writes ``bench/results.json``::

    {"cpus": N, "rows": {NAME: {"rps", "p50_ms", "p99_ms", "us_per_op", "redis_roundtrips"}}}

``--quick`` runs a few hundred requests per row: the CI smoke test, so the benchmark never
rots. Figures are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.loadgen import LoadResult, run_load
from tokensvc.embedded import RedisProcess, free_port
from tokensvc_client.v1 import tokensvc_pb2 as pb

SERVICE = "/tokensvc.v1.TokenService/"
ISSUER = "https://bench.tokensvc"
AUDIENCE = "mesh"
ROOT = Path(__file__).resolve().parents[1]


class Bench:
    def __init__(self, scale: float, out: Path) -> None:
        self.scale = scale
        self.out = out
        self.rows: dict[str, dict[str, float]] = {}
        self.ctx = multiprocessing.get_context("spawn")
        self.pool = self.ctx.Pool(1)
        self.step = 0

    def n(self, count: int) -> int:
        return max(50, int(count * self.scale))

    def progress(self, name: str) -> None:
        self.step += 1
        print(f"[{self.step:2d}] {name} ...", file=sys.stderr, flush=True)

    # -- measurement helpers ---------------------------------------------------------

    def load(self, target: str, method: str, requests: list[bytes], **kw: Any) -> LoadResult:
        result: LoadResult = self.pool.apply(run_load, (target, method, requests), kw)
        if result.errors:
            raise RuntimeError(f"{method}: {result.errors} failed requests")
        return result

    def record_load(self, name: str, result: LoadResult, **extra: float) -> None:
        lat = sorted(result.latencies)
        self.rows[name] = {
            "rps": round(len(lat) / result.seconds, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3),
            **extra,
        }

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
        "--log-level",
        "WARNING",
        # the load sends thousands of Issues for one subject: a limit it never reaches keeps
        # the per-subject rate check (inside Issue's script) in the measured path
        "--rate-issue",
        "100000000/1",
    ]


def bench_limits(b: Bench) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    b.progress("limit.ecdsa_sign / limit.ecdsa_verify (cryptography, one core)")
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"x" * 300  # about the size of a token's signing input
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    b.record_op("limit.ecdsa_sign", lambda: key.sign(message, ec.ECDSA(hashes.SHA256())), b.n(2000))
    b.record_op(
        "limit.ecdsa_verify",
        lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA256())),
        b.n(2000),
    )

    b.progress("limit.grpc_noop (grpc.aio server, no-op unary)")
    port = free_port()
    with process([sys.executable, "-m", "bench.noop_server", str(port)], "ready"):
        result = b.load(f"127.0.0.1:{port}", "/bench.Noop/Call", [b""] * b.n(6000))
    b.record_load("limit.grpc_noop", result)


def bench_service(b: Bench, redis_url: str, data_dir: Path) -> str:
    """Rows rpc.*; returns one valid access token for the interceptor rows."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    access = ""
    with process(tokensvc_args(port, redis_url, data_dir), "listening"):
        n = b.n(3000)
        b.progress("rpc.getkeys")
        b.record_load("rpc.getkeys", b.load(target, SERVICE + "GetKeys", [b""] * b.n(5000)))

        b.progress("rpc.issue")
        issue = pb.IssueRequest(
            subject="bench-user", roles=["reader"], client_id="bench"
        ).SerializeToString()
        result = b.load(target, SERVICE + "Issue", [issue] * n, keep_replies=True)
        b.record_load("rpc.issue", result)
        pairs = [pb.IssueResponse.FromString(r).tokens for r in result.replies]
        access = pairs[0].access_token

        b.progress("rpc.refresh")
        requests = [
            pb.RefreshRequest(refresh_token=p.refresh_token).SerializeToString() for p in pairs
        ]
        result = b.load(target, SERVICE + "Refresh", requests)
        b.record_load("rpc.refresh", result)

        b.progress("rpc.introspect")
        fresh = pb.IssueResponse.FromString(
            b.load(target, SERVICE + "Issue", [issue], keep_replies=True).replies[0]
        )
        access = fresh.tokens.access_token
        req = pb.IntrospectRequest(token=access).SerializeToString()
        result = b.load(target, SERVICE + "Introspect", [req] * n)
        b.record_load("rpc.introspect", result)
        check = b.load(target, SERVICE + "Introspect", [req], keep_replies=True).replies[0]
        if not pb.IntrospectResponse.FromString(check).active:
            raise RuntimeError(
                "benchmark token is not active: the Introspect row measured failures"
            )

    workers = os.cpu_count() or 1
    b.progress(f"rpc.issue.workers_n (workers={workers})")
    port = free_port()
    with process(tokensvc_args(port, redis_url, data_dir, workers), "listening"):
        time.sleep(1.0)  # let every worker bind
        result = b.load(f"127.0.0.1:{port}", SERVICE + "Issue", [issue] * b.n(3000))
    b.record_load("rpc.issue.workers_n", result, workers=workers)
    return access


def bench_interceptor(b: Bench, redis_url: str, data_dir: Path) -> None:
    from bench import interceptor_rows

    interceptor_rows.run(b, redis_url, data_dir)


RATIOS = [
    ("rpc.issue", "limit.grpc_noop", 0.50),
    ("rpc.refresh", "limit.grpc_noop", 0.40),
    ("rpc.introspect", "limit.grpc_noop", 0.60),
    ("rpc.issue.workers_n", "rpc.issue", 1.50),
    ("rpc.protected_noop", "rpc.unprotected_noop", 0.90),
]


def report(b: Bench) -> None:
    print(
        f"\ntokensvc benchmark — {os.cpu_count()} CPUs, {sys.platform}, Python {sys.version.split()[0]}"
    )
    print(f"{'row':28} {'rps':>10} {'p50 ms':>9} {'p99 ms':>9} {'µs/op':>9} {'redis trips':>12}")
    for name, row in b.rows.items():
        cells = [f"{row[k]:.1f}" if k in row else "" for k in ("rps",)]
        cells += [f"{row[k]:.3f}" if k in row else "" for k in ("p50_ms", "p99_ms")]
        cells += [f"{row[k]:.2f}" if k in row else "" for k in ("us_per_op", "redis_roundtrips")]
        print(f"{name:28} {cells[0]:>10} {cells[1]:>9} {cells[2]:>9} {cells[3]:>9} {cells[4]:>12}")
    print("\nratios (target in brackets):")
    for name, base, target in RATIOS:
        if name in b.rows and base in b.rows:
            ratio = b.rows[name]["rps"] / b.rows[base]["rps"]
            flag = "ok" if ratio >= target else "BELOW"
            print(f"  {name} / {base} = {ratio:.2f}  [≥ {target:.2f}] {flag}")
    if "interceptor.cold" in b.rows and "limit.ecdsa_verify" in b.rows:
        ratio = b.rows["interceptor.cold"]["us_per_op"] / b.rows["limit.ecdsa_verify"]["us_per_op"]
        print(
            f"  interceptor.cold / limit.ecdsa_verify = {ratio:.2f}x time  [≤ 1.50] {'ok' if ratio <= 1.5 else 'ABOVE'}"
        )
    if "interceptor.warm" in b.rows:
        warm = b.rows["interceptor.warm"]["us_per_op"]
        print(f"  interceptor.warm = {warm:.2f} µs  [≤ 10] {'ok' if warm <= 10 else 'ABOVE'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred requests per row (CI smoke)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)
    b = Bench(0.1 if args.quick else 1.0, args.out)
    with tempfile.TemporaryDirectory(prefix="tokensvc-bench-") as tmp:
        redis_proc = RedisProcess(Path(tmp) / "redis").start()
        try:
            bench_limits(b)
            bench_service(b, redis_proc.url, Path(tmp) / "data")
            bench_interceptor(b, redis_proc.url, Path(tmp) / "data")
        finally:
            redis_proc.stop()
            b.pool.close()
            b.pool.join()
    report(b)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "rows": b.rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0
