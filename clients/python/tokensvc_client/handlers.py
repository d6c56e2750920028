"""gRPC method handlers of every shape, for code that wraps or replaces them.

A method handler is unary or streamed in its request and in its response (its *kind*),
and its behaviour sits in the one of four attributes that matches that kind. A wrapper
that assumes one kind breaks the others, so the shapes are known here once: the
interceptors of this library use them to answer a call with a refusal of the right kind,
and tokensvc's server uses them for every wrapper it registers its handlers with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
#: (request_streaming, response_streaming)
Kind: TypeAlias = tuple[bool, bool]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
_BEHAVIOURS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def kind_of(handler: Handler) -> Kind:
    """``(request_streaming, response_streaming)`` of ``handler``."""
    return (handler.request_streaming, handler.response_streaming)


def behaviour_of(handler: Handler) -> Callable[..., Any]:
    """The behaviour function of ``handler``, whatever its kind."""
    behaviour: Callable[..., Any] | None = getattr(handler, _BEHAVIOURS[kind_of(handler)])
    assert behaviour is not None, "a method handler has the behaviour of its kind"
    return behaviour


def handler_of_kind(
    kind: Kind,
    behaviour: Callable[..., Any],
    template: Handler | None = None,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """A handler of ``kind`` running ``behaviour`` with ``template``'s (de)serialisers (its
    request deserializer replaced by ``request_deserializer`` if given).

    Without a template messages stay raw bytes: right for a handler that refuses the call
    without reading it (e.g. a caller that did not authenticate).
    """
    request = template.request_deserializer if template else None
    response = template.response_serializer if template else None
    return _FACTORIES[kind](
        behaviour,
        request_deserializer=request_deserializer or request,
        response_serializer=response,
    )
