"""Closed-loop load generator, run in its own process so it does not share the server's
interpreter: ``concurrency`` coroutines on one grpc.aio channel send pre-serialized
requests (raw bytes, no protobuf work on the client side) until ``count`` are done."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc
import grpc.aio


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float]
    errors: int
    replies: list[bytes]


async def _run(
    target: str,
    method: str,
    requests: list[bytes],
    concurrency: int,
    keep_replies: bool,
    metadata: tuple[tuple[str, str], ...],
) -> LoadResult:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)
        # the first request connects and warms up; it is not timed
        first = await call(requests[0], metadata=metadata, timeout=10)
        latencies: list[float] = []
        replies: list[bytes] = [first] + [b""] * (len(requests) - 1) if keep_replies else []
        errors = 0
        next_index = 1

        async def worker() -> None:
            nonlocal next_index, errors
            while next_index < len(requests):
                i = next_index
                next_index += 1
                start = time.perf_counter()
                try:
                    reply = await call(requests[i], metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if keep_replies:
                    replies[i] = reply

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return LoadResult(time.perf_counter() - began, latencies, errors, replies)


def run_load(
    target: str,
    method: str,
    requests: list[bytes],
    concurrency: int = 32,
    keep_replies: bool = False,
    metadata: tuple[tuple[str, str], ...] = (),
) -> LoadResult:
    """Entry point for a multiprocessing worker."""
    return asyncio.run(_run(target, method, requests, concurrency, keep_replies, metadata))
