"""gRPC method handlers of the asyncio server: their shapes, and the one wrapper every
server-side wrapper (the drain, the decoding guard, the RPC metrics, the stream limits) uses.

A ``grpc.aio`` handler is unary or streamed in its request and in its response; its behaviour
is a coroutine function, or for streamed responses either an async generator function or a
coroutine function that writes with ``context.write`` and returns (grpc_health's
``Health.Watch``). A wrapper that assumes one of these breaks the others (``async for`` over a
coroutine is a ``TypeError`` the caller sees as UNKNOWN), so they are hidden here once:
:func:`wrap` hands a wrapper the behaviour as a coroutine function (:data:`Behaviour`; an
async generator becomes a coroutine that writes what it yields) and registers what the
wrapper returns under the handler's own shape. A wrapper is then one coroutine around another,
whatever the RPC. Synchronous behaviours (gRPC runs them on a thread) are left alone: the
server registers none.

:class:`Wrapped` remembers each method's wrapped handler, so an interceptor does not rebuild
it per call while the handler it wraps stays the same object.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Context = grpc.aio.ServicerContext

#: A behaviour as every wrapper sees it: ``(request or request iterator, context)`` -> the
#: response (unary responses) or None (streamed responses, written with ``context.write``).
Behaviour: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
#: A wrapper: the behaviour it runs around -> the behaviour to register.
Around: TypeAlias = Callable[[Behaviour], Behaviour]
#: (request_streaming, response_streaming)
Kind: TypeAlias = tuple[bool, bool]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
#: Every shape a handler can have.
KINDS: tuple[Kind, ...] = tuple(_FACTORIES)


def kind_of(handler: Handler) -> Kind:
    return (handler.request_streaming, handler.response_streaming)


def behaviour_of(handler: Handler) -> Callable[..., Any]:
    """The behaviour function of ``handler``, whatever its shape."""
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behaviour is not None, "a method handler has a behaviour"
    return behaviour


def as_coroutine(behaviour: Callable[..., Any]) -> Behaviour | None:
    """``behaviour`` as a coroutine function; None for a synchronous one."""
    if inspect.iscoroutinefunction(behaviour):
        return behaviour
    if inspect.isasyncgenfunction(behaviour):
        generator: Callable[..., Any] = behaviour

        async def written(request: Any, context: Context) -> None:
            async with contextlib.aclosing(generator(request, context)) as responses:
                async for response in responses:
                    await context.write(response)

        return written
    return None


def handler_of_kind(
    kind: Kind,
    behaviour: Callable[..., Any],
    template: Handler | None = None,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """A handler of ``kind`` running ``behaviour`` with ``template``'s (de)serialisers
    (its request deserializer replaced by ``request_deserializer`` if given); without a
    template, messages stay raw bytes: right for a handler that refuses the call without
    reading it."""
    request = template.request_deserializer if template else None
    response = template.response_serializer if template else None
    return _FACTORIES[kind](
        behaviour,
        request_deserializer=request_deserializer or request,
        response_serializer=response,
    )


def wrap(
    handler: Handler,
    around: Around,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """``handler`` with its behaviour run inside ``around`` (its shape and serialisers
    kept, the request deserializer replaced if given); a synchronous handler as it is."""
    behaviour = as_coroutine(behaviour_of(handler))
    if behaviour is None:
        return handler
    return handler_of_kind(
        kind_of(handler), around(behaviour), handler, request_deserializer=request_deserializer
    )


class Wrapped:
    """Handlers wrapped by ``around(method, handler)``, remembered per method.

    A method's entry is rebuilt only when the handler it wraps is another object (an
    interceptor further in that builds its handlers per call); entries exist only for
    methods the server serves, so the table is bounded by them.
    """

    __slots__ = ("_around", "_by_method")

    def __init__(self, around: Callable[[str, Handler], Handler]) -> None:
        self._around = around
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def __call__(self, method: str, handler: Handler) -> Handler:
        known = self._by_method.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._around(method, handler)
        self._by_method[method] = (handler, wrapped)
        return wrapped
