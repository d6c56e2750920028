"""Requests that are not valid protobuf (e.g. invalid UTF-8 in a string field) get
INVALID_ARGUMENT, for every RPC the server registers.

gRPC calls a method's request deserializer before any of our code runs; when it raises,
grpc.aio logs an ERROR traceback and answers UNKNOWN with the exception text. So every
handler is registered through :class:`DecodingGuard`: its deserializer turns a parse
failure into :data:`UNDECODABLE` (logged once, at INFO, without a traceback), and the call
is refused ``INVALID_ARGUMENT`` :data:`NOT_DECODABLE`. The token service's own methods
refuse it inside the wrapper they already have (:func:`tokensvc.api.status.rpc`, marked
:data:`CHECKS_DECODING`), so their hot path gains one ``try`` and one ``is`` test; other
services' methods get a small wrapper (:func:`tokensvc.handlers.wrap`, whatever their
shape): a unary request is checked before the method runs, a streamed one (reflection) as
the method reads it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc
from google.protobuf.message import DecodeError

from tokensvc.handlers import (
    Behaviour,
    Context,
    Handler,
    behaviour_of,
    handler_of_kind,
    kind_of,
    wrap,
)

log = logging.getLogger("tokensvc.decoding")

NOT_DECODABLE: Final = "request is not valid protobuf/UTF-8"
#: Attribute of a behaviour that refuses :data:`UNDECODABLE` itself.
CHECKS_DECODING: Final = "_tokensvc_checks_decoding"

if TYPE_CHECKING:
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    GenericHandler = grpc.GenericRpcHandler


class _Undecodable:
    """The request a tolerant deserializer returns for bytes it cannot parse."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE: Final = _Undecodable()


def tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserialize``, returning :data:`UNDECODABLE` instead of raising on bad bytes."""

    def deserializer(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as err:
            log.info("refused a request: %s (%s)", NOT_DECODABLE, err)
            return UNDECODABLE

    return deserializer


async def _refuse(context: Context) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NOT_DECODABLE)


def _checked(behaviour: Behaviour) -> Behaviour:
    """``behaviour``, refusing an :data:`UNDECODABLE` request before it runs."""

    async def checked(request: Any, context: Context) -> Any:
        if request is UNDECODABLE:
            await _refuse(context)
        return await behaviour(request, context)

    return checked


async def _decoded(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """The messages of a request stream, ending the call at the first undecodable one."""
    async for request in requests:
        if request is UNDECODABLE:
            await _refuse(context)
        yield request


def _checked_stream(behaviour: Behaviour) -> Behaviour:
    """``behaviour`` of a streamed request, reading it through :func:`_decoded` (a
    behaviour that reads with ``context.read()`` sees :data:`UNDECODABLE` itself)."""

    async def checked(requests: AsyncIterator[Any], context: Context) -> Any:
        return await behaviour(_decoded(requests, context), context)

    return checked


def guarded(handler: Handler) -> Handler:
    """``handler`` with a tolerant deserializer and a behaviour refusing what it cannot
    parse (unchanged without a deserializer)."""
    if handler.request_deserializer is None:
        return handler
    deserializer = tolerant(handler.request_deserializer)
    if getattr(behaviour_of(handler), CHECKS_DECODING, False):
        return handler_of_kind(
            kind_of(handler), behaviour_of(handler), handler, request_deserializer=deserializer
        )
    check = _checked_stream if handler.request_streaming else _checked
    return wrap(handler, check, request_deserializer=deserializer)


class _GuardedGenericHandler(GenericHandler):
    """A generic handler whose handlers are :func:`guarded` (each built once)."""

    def __init__(self, inner: GenericHandler) -> None:
        self._inner = inner
        self._built: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        built = self._built.get(method)
        if built is None:
            found = self._inner.service(handler_call_details)
            if found is None:
                return None  # an unknown method: nothing to remember
            built = self._built[method] = guarded(found)
        return built


class DecodingGuard:
    """Stands in for a ``grpc.aio.Server`` where generated code registers handlers
    (``add_XServicer_to_server(servicer, DecodingGuard(server))``, reflection's
    ``enable_server_reflection``) and registers them :func:`guarded`."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers([_GuardedGenericHandler(h) for h in handlers])

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        guarded_handlers = {name: guarded(h) for name, h in method_handlers.items()}
        # (newer than the type stubs)
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]
            service_name, guarded_handlers
        )
