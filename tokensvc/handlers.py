"""The one wrapper every server-side wrapper of gRPC method handlers uses (the drain, the
decoding guard, the RPC metrics, the stream limits), and the registrar that applies them.
The handlers' shapes (kind, behaviour, a handler of a kind) are the client library's
:mod:`tokensvc_client.handlers`, which its interceptors use too.

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

:class:`Registrar` applies the server's wrappers once, when a service registers its
methods, instead of in gRPC server interceptors: grpc.aio runs every interceptor as a chain
of coroutines on every call, about 10 to 15 µs of server CPU per interceptor per call on the
development machine (docs/performance.md), while a handler wrapped at registration costs
only the wrapper's own coroutine.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from tokensvc_client.handlers import Handler, behaviour_of, handler_of_kind, kind_of

if TYPE_CHECKING:  # generic in grpc-stubs only
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    GenericHandler: TypeAlias = grpc.GenericRpcHandler[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    GenericHandler = grpc.GenericRpcHandler

#: A behaviour as every wrapper sees it: ``(request or request iterator, context)`` -> the
#: response (unary responses) or None (streamed responses, written with ``context.write``).
Behaviour: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
#: A wrapper: the behaviour it runs around -> the behaviour to register.
Around: TypeAlias = Callable[[Behaviour], Behaviour]
#: A method's wrapper: (the method's full name, its handler) -> the handler to register.
MethodWrapper: TypeAlias = Callable[[str, Handler], Handler]


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


class _WrappedGenericHandler(GenericHandler):
    """A generic handler whose handlers are wrapped, each built once per method."""

    def __init__(self, inner: GenericHandler, wrapped: MethodWrapper) -> None:
        self._inner = inner
        self._wrapped = wrapped
        self._built: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        built = self._built.get(method)
        if built is None:
            found = self._inner.service(handler_call_details)
            if found is None:
                return None  # an unknown method: nothing to remember, so the table is bounded
            built = self._built[method] = self._wrapped(method, found)
        return built


class Registrar:
    """Stands in for a ``grpc.aio.Server`` where generated code registers handlers
    (``add_XServicer_to_server(servicer, registrar)``, reflection's
    ``enable_server_reflection``) and registers each handler wrapped by ``wrappers``, the
    first innermost, once per method (see the module doc)."""

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[MethodWrapper]) -> None:
        self._server = server
        self._wrappers = tuple(wrappers)

    def _wrapped(self, method: str, handler: Handler) -> Handler:
        for wrapper in self._wrappers:
            handler = wrapper(method, handler)
        return handler

    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            [_WrappedGenericHandler(h, self._wrapped) for h in handlers]
        )

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        wrapped = {
            name: self._wrapped(f"/{service_name}/{name}", handler)
            for name, handler in method_handlers.items()
        }
        # (newer than the type stubs)
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name, wrapped
        )
