"""A process holding idle WatchRevocations streams, for the bench's feed rows.

``python -m bench.watchers TARGET STREAMS EXPECTED`` opens ``STREAMS`` streams over four
connections, prints ``ready`` once every stream received ``EXPECTED`` events (the RESET
and the revocations in force), then keeps them open and idle until it is terminated.
"""

from __future__ import annotations

import asyncio
import sys

import grpc.aio

from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc


async def main(target: str, streams: int, expected: int) -> None:
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [pb_grpc.TokenServiceStub(c) for c in channels]
    caught_up = 0

    async def watch(stub: pb_grpc.TokenServiceStub) -> None:
        nonlocal caught_up
        seen = 0
        async for _event in stub.WatchRevocations(pb.WatchRevocationsRequest()):
            seen += 1
            if seen == expected:
                caught_up += 1
                if caught_up == streams:
                    print("ready", flush=True)

    await asyncio.gather(*(watch(stubs[i % len(stubs)]) for i in range(streams)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
