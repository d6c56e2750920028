"""Closed-loop load generator, run in processes of its own so it does not share the server's
interpreter: ``concurrency`` coroutines spread over ``channels`` grpc.aio channels (each its
own TCP connection, so ``SO_REUSEPORT`` can spread them over server workers) send
pre-serialized requests (raw bytes, no protobuf work on the client side) until all are done.

Several load processes start their timed part at the same wall-clock instant (``start_at``)
after connecting and sending one untimed request per channel, so the parent can measure the
server's CPU over the same window.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float]
    errors: int
    replies: list[bytes]
    #: CPU seconds the load process itself used in the timed window
    cpu: float = 0.0
    #: CPU seconds the server's processes used in the window (set by Bench.load)
    server_cpu: float = 0.0
    #: wall-clock start and end of the timed window (time.time())
    began: float = 0.0
    ended: float = 0.0
    error_codes: list[str] = field(default_factory=list)


def merge(results: list[LoadResult]) -> LoadResult:
    """One result for several load processes run at once."""
    began = min(r.began for r in results)
    ended = max(r.ended for r in results)
    return LoadResult(
        seconds=ended - began,
        latencies=[x for r in results for x in r.latencies],
        errors=sum(r.errors for r in results),
        replies=[x for r in results for x in r.replies],
        cpu=sum(r.cpu for r in results),
        began=began,
        ended=ended,
        error_codes=[c for r in results for c in r.error_codes][:5],
    )


async def _run(
    target: str,
    method: str,
    requests: list[bytes],
    concurrency: int,
    channels: int,
    keep_replies: bool,
    metadata: tuple[tuple[str, str], ...],
    start_at: float,
) -> LoadResult:
    # a local subchannel pool per channel: otherwise grpc shares one connection among them
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, min(channels, len(requests))))
    ]
    try:
        calls = [ch.unary_unary(method) for ch in opened]
        # the first request of each channel connects and warms up; it is not timed
        replies: list[bytes] = [b""] * len(requests) if keep_replies else []
        for i, call in enumerate(calls):
            reply = await call(requests[i], metadata=metadata, timeout=10)
            if keep_replies:
                replies[i] = reply
        latencies: list[float] = []
        errors: list[str] = []
        next_index = len(calls)

        async def worker(call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]) -> None:
            nonlocal next_index
            while next_index < len(requests):
                i = next_index
                next_index += 1
                start = time.perf_counter()
                try:
                    reply = await call(requests[i], metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as err:
                    errors.append(str(err.code()))
                    continue
                latencies.append(time.perf_counter() - start)
                if keep_replies:
                    replies[i] = reply

        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu0, began = time.process_time(), time.time()
        await asyncio.gather(*(worker(calls[i % len(calls)]) for i in range(concurrency)))
        ended = time.time()
        return LoadResult(
            ended - began,
            latencies,
            len(errors),
            replies,
            cpu=time.process_time() - cpu0,
            began=began,
            ended=ended,
            error_codes=errors[:5],
        )
    finally:
        for ch in opened:
            await ch.close()


def run_load(
    target: str,
    method: str,
    requests: list[bytes],
    concurrency: int = 32,
    channels: int = 1,
    keep_replies: bool = False,
    metadata: tuple[tuple[str, str], ...] = (),
    start_at: float = 0.0,
) -> LoadResult:
    """Entry point for a multiprocessing worker."""
    return asyncio.run(
        _run(target, method, requests, concurrency, channels, keep_replies, metadata, start_at)
    )
