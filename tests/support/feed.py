"""For the tests of the revocation feed: a WatchRevocations stream read on a thread
(:class:`Watcher`), and a started client feed of either kind (:class:`Feed`; the
``make_feed`` fixture of tests/client makes them)."""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

import grpc
import grpc.aio

from tests.support.waiting import wait_until
from tokensvc_client import (
    FEED_CHANNEL_OPTIONS,
    AioRevocationFeed,
    RevocationFeed,
    aio_channel,
    channel,
)
from tokensvc_client.v1 import tokensvc_pb2 as pb

#: the issue's bound: a revocation reaches the interceptors within a second. Tests wait up to
#: it (scaled by TOKENSVC_TEST_TIME_FACTOR) and print what they saw; `make bench` measures it
PROPAGATION_BOUND = 1.0


class Feed:
    """A started feed of either kind, with blocking helpers for the test."""

    def __init__(self, target: str, kind: str, **kw: Any) -> None:
        self.kind = kind
        if kind == "sync":
            self._channel = channel(target, insecure=True, options=FEED_CHANNEL_OPTIONS)
            self.feed: RevocationFeed | AioRevocationFeed = RevocationFeed(
                self._channel, **kw
            ).start()
            return
        # the asyncio feed runs on its own loop; its check is called from the sample
        # server's loop thread (checks are thread-safe)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> tuple[AioRevocationFeed, grpc.aio.Channel]:
            ch = aio_channel(target, insecure=True, options=FEED_CHANNEL_OPTIONS)
            return AioRevocationFeed(ch, **kw).start(), ch

        self.feed, self._aio_channel = self._run(start())

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def wait_connected(self, timeout: float = 10) -> bool:
        if isinstance(self.feed, RevocationFeed):
            return self.feed.wait_connected(timeout)
        return bool(self._run(self.feed.wait_connected(timeout), timeout + 5))

    def close(self) -> None:
        if isinstance(self.feed, RevocationFeed):
            self.feed.close()
            self._channel.close()
            return
        self._run(self.feed.close())
        self._run(self._aio_channel.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class Watcher:
    """Reads a WatchRevocations stream on a thread into a queue."""

    def __init__(self, stub, resume_from: str = "") -> None:
        self.events: queue.Queue[pb.RevocationEvent] = queue.Queue()
        self.call = stub.WatchRevocations(pb.WatchRevocationsRequest(resume_from=resume_from))
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as err:
            self.error = err

    def next(self, timeout: float = 5.0) -> pb.RevocationEvent:
        return self.events.get(timeout=timeout)

    def take(self, count: int) -> list[pb.RevocationEvent]:
        return [self.next() for _ in range(count)]

    def refusal(self, timeout: float = 10.0) -> grpc.RpcError:
        """The error that ended the stream, once it has ended."""
        return wait_until(lambda: self.error, timeout, what="the stream to be refused")

    def close(self) -> None:
        self.call.cancel()
