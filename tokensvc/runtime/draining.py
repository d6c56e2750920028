"""Graceful shutdown without CANCELLED: calls in flight finish, new calls are refused
``UNAVAILABLE`` (which every client retries, on another replica) until the listener closes.

gRPC's own ``server.stop(grace)`` lets in-flight calls finish, but calls that reach the
server just as it stops are dropped, and their callers see ``CANCELLED``, which clients do
not retry. So a stopping server first *drains*: :class:`Drain`, the outermost of the wrappers
every handler is registered with (:class:`tokensvc.handlers.Registrar`: a refused call runs
none of our other code; gRPC has decoded a unary request by then, and with traces exported
the call has its span), answers every new call ``UNAVAILABLE`` while the connections stay
open, and only once the calls in flight are done does the server stop.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import grpc
import grpc.aio

from tokensvc.config import Settings
from tokensvc.handlers import Behaviour, Context, wrap
from tokensvc_client.handlers import Handler

#: Streams that last until the server stops, whatever the drain waits for: not counted
#: (a health watcher is told NOT_SERVING when the drain starts, and the stop ends it).
ENDLESS: Final = frozenset({"/grpc.health.v1.Health/Watch"})
_MESSAGE = "tokensvc is shutting down; retry (another replica will answer)"


class Drain:
    """Counts the calls in flight; after :meth:`start` refuses new ones UNAVAILABLE.

    :meth:`wrapper` is the method wrapper (:data:`tokensvc.handlers.MethodWrapper`) doing it.
    The count covers the handler's whole run (a stream until its last message).
    """

    def __init__(self) -> None:
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._released = asyncio.Event()
        self._last_arrival = 0.0  # time.monotonic() of the newest call
        self._held = 0  # refused calls waiting for release()

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
        deadline = time.monotonic() + timeout
        while (now := time.monotonic()) < deadline:
            wait = self._last_arrival + period - now
            if wait <= 0:
                return
            await asyncio.sleep(min(wait, deadline - now))

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

    def wrapper(self, method: str, handler: Handler) -> Handler:
        """``handler`` refusing calls once draining, and counted unless it is
        :data:`ENDLESS`; a :data:`tokensvc.handlers.MethodWrapper`."""
        return wrap(handler, self._admit if method in ENDLESS else self._count)

    def _count(self, behaviour: Behaviour) -> Behaviour:
        async def counted(request: Any, context: Context) -> Any:
            self._last_arrival = time.monotonic()
            if self.draining:
                await self._refuse(context)  # reads no streamed request
            self._enter()
            try:
                return await behaviour(request, context)
            finally:
                self._leave()

        return counted

    def _admit(self, behaviour: Behaviour) -> Behaviour:
        async def admitted(request: Any, context: Context) -> Any:
            self._last_arrival = time.monotonic()
            if self.draining:
                await self._refuse(context)
            return await behaviour(request, context)

        return admitted

    async def _refuse(self, context: Context) -> None:
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
