"""Graceful shutdown without CANCELLED: calls in flight finish, new calls are refused
``UNAVAILABLE`` (which every client retries, on another replica) until the listener closes.

gRPC's own ``server.stop(grace)`` lets in-flight calls finish, but calls that reach the
server just as it stops are dropped, and their callers see ``CANCELLED``, which clients do
not retry. So a stopping server first *drains*: the :class:`Drain` interceptor (first in
the chain, so a refused call costs nothing else) answers every new call ``UNAVAILABLE``
while the connections stay open, and only once the calls in flight are done does the
server stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
import grpc.aio

from tokensvc.config import Settings
from tokensvc.handlers import (
    KINDS,
    Behaviour,
    Context,
    Handler,
    Wrapped,
    handler_of_kind,
    kind_of,
    wrap,
)

#: Streams that last until the server stops, whatever the drain waits for: not counted
#: (a health watcher is told NOT_SERVING when the drain starts, and the stop ends it).
ENDLESS: Final = frozenset({"/grpc.health.v1.Health/Watch"})
_MESSAGE = "tokensvc is shutting down; retry (another replica will answer)"


class Drain(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts the calls in flight; after :meth:`start` refuses new ones UNAVAILABLE.

    The count covers the handler's whole run (a stream until its last message).
    """

    def __init__(self) -> None:
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._released = asyncio.Event()
        self._last_arrival = 0.0  # loop time of the newest call
        self._held = 0  # refused calls waiting for release()
        self._counted = Wrapped(lambda _method, handler: wrap(handler, self._count))
        # one refusing handler per shape; it never reads the request
        self._refusals = {kind: handler_of_kind(kind, self._refuse) for kind in KINDS}

    def start(self) -> None:
        """Refuse new calls from now on (they wait for :meth:`release`)."""
        self.draining = True

    @property
    def held(self) -> int:
        """Refused calls waiting for :meth:`release`."""
        return self._held

    def release(self) -> None:
        """Answer the refused calls: the server has told the clients it is going away."""
        self._released.set()

    async def wait_quiet(self, period: float, timeout: float) -> None:
        """Wait until no new call has arrived for ``period`` s (at most ``timeout`` s):
        calls still queued inside gRPC, not yet handed to us, would be CANCELLED by the
        stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            wait = self._last_arrival + period - loop.time()
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, deadline - loop.time()))

    async def _hold(self) -> None:
        self._held += 1
        try:
            await self._released.wait()
        finally:
            self._held -= 1

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight (at most ``timeout`` s); whether that happened."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        self._last_arrival = asyncio.get_running_loop().time()
        if self.draining:
            return self._refusals[kind_of(handler)]
        method = handler_call_details.method
        if method in ENDLESS:
            return handler
        return self._counted(method, handler)

    def _count(self, behaviour: Behaviour) -> Behaviour:
        async def counted(request: Any, context: Context) -> Any:
            self._enter()
            try:
                return await behaviour(request, context)
            finally:
                self._leave()

        return counted

    async def _refuse(self, _request: Any, context: Context) -> None:
        await self._hold()
        await context.abort(grpc.StatusCode.UNAVAILABLE, _MESSAGE)

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


def stream_limits(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC server options bounding what clients can hold open: calls per connection
    (``--max-concurrent-streams``, the HTTP/2 setting; a client asking for more waits for
    one to end) and connections per process (``--max-connections``; gRPC refuses the
    rest). gRPC has no per-client connection cap of its own; streams are capped per client
    where they are served (reflection, WatchRevocations)."""
    return [
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
    ]
