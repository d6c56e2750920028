"""Rows interceptor.cold / interceptor.warm (µs per decision of the interceptor's shared
logic, keys already cached) and rpc.protected_noop / rpc.unprotected_noop (the same no-op
server with and without the asyncio AuthInterceptor, loaded in turn, three rounds each, the
median round kept), plus redis_roundtrips per RPC counted
with MONITOR (commands run inside Lua scripts are not round trips and are not counted)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import redis

from bench.loadgen import LoadResult
from bench.run import AUDIENCE, ISSUER, Bench, Target, process
from tokensvc.redis.embedded import free_port
from tokensvc_client import KeySet, TokenClient
from tokensvc_client._auth import Authenticator
from tokensvc_client.verifier import Claims, Verifier

METHOD = "/bench.Noop/Call"
ROWS = ("interceptor.cold", "interceptor.warm", "rpc.protected_noop", "rpc.unprotected_noop")
TARGETS = [
    Target("rpc.protected_noop", "rpc.unprotected_noop", at_least=0.9),
    Target("rpc.protected_noop", "rpc.unprotected_noop", "server_cpu_us", at_most=1.15),
    Target("interceptor.warm", "", "us_per_op", at_most=10),
    Target("interceptor.cold", "limit.ecdsa_verify", "us_per_op", at_most=1.5),
]


def _decide(auth: Authenticator, metadata: Any, keys: KeySet) -> Claims:
    decision = auth.decide(METHOD, metadata)
    next(decision)
    try:
        decision.send(keys)
    except StopIteration as done:
        if not isinstance(done.value, Claims):
            raise RuntimeError(f"bench token rejected: {done.value}") from None
        return done.value
    raise RuntimeError("decision wanted more keys")


def roundtrips(redis_url: str, calls: list[Any]) -> float:
    """Top-level commands (= round trips) per call, read from MONITOR."""
    client = redis.Redis.from_url(redis_url)
    lines: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        with client.monitor() as monitor:
            ready.set()
            while not stop.is_set():
                cmd = monitor.next_command()
                if cmd["command"] == "PING bench-end":
                    return
                lines.append(cmd)

    ready = threading.Event()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    for call in calls:
        call()
    redis.Redis.from_url(redis_url).execute_command("PING", "bench-end")
    thread.join(10)
    stop.set()
    # commands run by a Lua script are not round trips; neither are the audit trail's XADDs,
    # which a background task writes in batches, off the request path (tokensvc.observe.audit)
    top = [
        c
        for c in lines
        if c.get("client_type") != "lua"
        and c.get("client_address") != "lua"
        and not c["command"].startswith("XADD ")
    ]
    return len(top) / len(calls)


def run(b: Bench) -> None:
    noop_port, open_port = free_port(), free_port()
    with b.serve() as server:
        target = server.target
        client = TokenClient(target, insecure=True)
        count = b.n(1000)
        b.progress("redis_roundtrips (MONITOR) for Issue / Refresh / Introspect")
        pairs = [client.issue("bench-user") for _ in range(20)]
        trips = {
            "rpc.issue": [lambda: client.issue("bench-user") for _ in range(20)],
            "rpc.refresh": [lambda p=p: client.refresh(p.refresh_token) for p in pairs],
            "rpc.introspect": [lambda: client.introspect(pairs[0].access_token)] * 20,
        }
        for row, calls in trips.items():
            b.rows.setdefault(row, {})["redis_roundtrips"] = roundtrips(b.redis_url, calls)

        b.progress("interceptor.cold / interceptor.warm")
        tokens = [client.issue("bench-user", roles=["reader"]).access_token for _ in range(count)]
        keys = client.get_keys().key_set()
        headers = [(("authorization", f"Bearer {t}"),) for t in tokens]
        cold = float("inf")
        for _ in range(3):  # best of three, each with empty caches: every token new
            auth = Authenticator(Verifier(ISSUER, AUDIENCE, cache_size=count * 2))
            start = time.perf_counter()
            for md in headers:
                _decide(auth, md, keys)
            cold = min(cold, (time.perf_counter() - start) / count * 1e6)
        b.rows["interceptor.cold"] = {"us_per_op": round(cold, 2), "rps": round(1e6 / cold, 1)}
        b.record_op("interceptor.warm", lambda: _decide(auth, headers[0], keys), b.n(20000))

        b.progress("rpc.unprotected_noop / rpc.protected_noop")
        md = (("authorization", f"Bearer {tokens[-1]}"),)
        n = b.n(6000)
        noop = [sys.executable, "-m", "bench.noop_server"]
        # both servers up at once and loaded in turn, three rounds: a burst of other work on
        # a shared machine falls on both sides alike; each row is the median of its rounds
        with (
            process([*noop, str(open_port)], "ready") as open_proc,
            process(
                [*noop, str(noop_port), "--protected", ISSUER, AUDIENCE, target], "ready"
            ) as guarded,
        ):
            runs: dict[str, list[LoadResult]] = {}
            for _ in range(3):
                for name, port, pid in (
                    ("rpc.unprotected_noop", open_port, open_proc.pid),
                    ("rpc.protected_noop", noop_port, guarded.pid),
                ):
                    result = b.load(
                        f"127.0.0.1:{port}", METHOD, [b""] * n, metadata=md, server_pid=pid
                    )
                    runs.setdefault(name, []).append(result)
        for name, results in runs.items():
            b.record_load(name, sorted(results, key=lambda r: r.server_cpu)[len(results) // 2])
        client.close()
