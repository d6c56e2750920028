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
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
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

    async def _refuse_unary(self, _request: Any, context: Any) -> Any:
        await self._hold()
        await context.abort(grpc.StatusCode.UNAVAILABLE, _MESSAGE)

    async def _refuse_stream(self, _request: Any, context: Any) -> AsyncIterator[Any]:
        await self._hold()
        await context.abort(grpc.StatusCode.UNAVAILABLE, _MESSAGE)
        yield  # pragma: no cover (abort raises): makes this an async generator

    def _refusal(self, handler: Handler) -> Handler:
        """A handler of the same shape as ``handler`` that answers UNAVAILABLE."""
        request, response = handler.request_deserializer, handler.response_serializer
        unary, stream = self._refuse_unary, self._refuse_stream
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream, request, response)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, request, response)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(stream, request, response)
        return grpc.unary_unary_rpc_method_handler(unary, request, response)

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
            return self._refusal(handler)
        return self._counted(handler)

    def _counted(self, handler: Handler) -> Handler:
        request, response = handler.request_deserializer, handler.response_serializer
        behaviour = (
            handler.stream_stream
            or handler.unary_stream
            or handler.stream_unary
            or handler.unary_unary
        )
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler  # a sync handler (gRPC runs it on a thread): not counted
        if handler.response_streaming:
            inner_stream: Any = behaviour

            async def stream(req: Any, context: Any) -> AsyncIterator[Any]:
                self._enter()
                try:
                    async for item in inner_stream(req, context):
                        yield item
                finally:
                    self._leave()

            if handler.request_streaming:
                return grpc.stream_stream_rpc_method_handler(stream, request, response)
            return grpc.unary_stream_rpc_method_handler(stream, request, response)
        inner: Any = behaviour

        async def unary(req: Any, context: Any) -> Any:
            self._enter()
            try:
                return await inner(req, context)
            finally:
                self._leave()

        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, request, response)
        return grpc.unary_unary_rpc_method_handler(unary, request, response)

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
