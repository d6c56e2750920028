"""Requests that are not valid protobuf (e.g. invalid UTF-8 in a string field) get
INVALID_ARGUMENT, for every RPC the server registers.

gRPC calls a method's request deserializer before any of our code runs; when it raises,
grpc.aio logs an ERROR traceback and answers UNKNOWN with the exception text. So every
handler is registered through :func:`guarded` (the innermost of the server's registration
wrappers, :class:`tokensvc.handlers.Registrar`): its deserializer turns a parse
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
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from tokensvc.handlers import Behaviour, Context, wrap
from tokensvc_client.handlers import Handler, behaviour_of, handler_of_kind, kind_of

log = logging.getLogger("tokensvc.decoding")

NOT_DECODABLE: Final = "request is not valid protobuf/UTF-8"
#: Attribute of a behaviour that refuses :data:`UNDECODABLE` itself.
CHECKS_DECODING: Final = "_tokensvc_checks_decoding"


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


def guarded(_method: str, handler: Handler) -> Handler:
    """``handler`` with a tolerant deserializer and a behaviour refusing what it cannot
    parse (unchanged without a deserializer); a :data:`tokensvc.handlers.MethodWrapper`."""
    if handler.request_deserializer is None:
        return handler
    deserializer = tolerant(handler.request_deserializer)
    if getattr(behaviour_of(handler), CHECKS_DECODING, False):
        return handler_of_kind(
            kind_of(handler), behaviour_of(handler), handler, request_deserializer=deserializer
        )
    check = _checked_stream if handler.request_streaming else _checked
    return wrap(handler, check, request_deserializer=deserializer)
