"""A WatchRevocations stream read on a thread, for the tests of the revocation feed."""

from __future__ import annotations

import queue
import threading

import grpc

from tests.support.waiting import wait_until
from tokensvc_client.v1 import tokensvc_pb2 as pb


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
