"""Method names and method handlers, as the interceptors and the decision need them.

:func:`method_key` and :class:`MethodFilter` say which methods a configuration entry (an
exempt entry, a step-up key) names: a full method name or a prefix ending in "/". The
rest is what the blocking and the asyncio interceptor share about gRPC method handlers:
their kind (request/response streaming), their behaviour, and a handler of the same kind
with another behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc

#: A full method name ("/pkg.Service/Method"), or a prefix: one service ("/pkg.Service/")
#: or every method ("/").
_FULL_METHOD = re.compile(r"/[^/\s]+/[^/\s]+")
_METHOD_PREFIX = re.compile(r"/(?:[^/\s]+/)?")


def method_key(key: object, what: str) -> str:
    """``key`` if it is a full method name or a prefix ending in "/", else ValueError.

    A key like ``"/shop.Admin"`` (neither) would silently match nothing: a mistake that
    protects or exempts nothing must fail where the interceptor is built.

    Raises:
        ValueError: naming the key and ``what`` it is (e.g. "step_up key").
    """
    if not isinstance(key, str) or not (
        _FULL_METHOD.fullmatch(key) or _METHOD_PREFIX.fullmatch(key)
    ):
        raise ValueError(
            f"{what} {key!r} is neither a full method name '/pkg.Service/Method' nor a "
            "prefix ending in '/' ('/pkg.Service/')"
        )
    return key


class MethodFilter:
    """A set of full method names ("/pkg.Service/Method") and prefixes.

    An entry ending in "/" is a prefix ("/grpc.health.v1.Health/" covers every method of
    that service); any other entry matches only exactly, so exempting "/pkg.Svc/Get"
    never exempts "/pkg.Svc/GetSecret". Anything else is refused (:func:`method_key`).
    """

    def __init__(self, entries: Iterable[str]) -> None:
        if isinstance(entries, str):
            raise TypeError("pass a collection of method names, not one string")
        entries = tuple(method_key(e, "exempt entry") for e in entries)
        self._exact = frozenset(e for e in entries if not e.endswith("/"))
        self._prefixes = tuple(e for e in entries if e.endswith("/"))

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and (
            method in self._exact or method.startswith(self._prefixes)
        )


# -- method handlers ---------------------------------------------------------------------

if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
#: (request_streaming, response_streaming)
Kind = tuple[bool, bool]

_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def kind_of(handler: Handler) -> Kind:
    return (handler.request_streaming, handler.response_streaming)


def behaviour_of(handler: Handler) -> Callable[..., Any]:
    """The behaviour function of a handler, whatever its kind."""
    behaviour = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind_of(handler)]
    assert behaviour is not None
    return behaviour


def handler_of_kind(
    kind: Kind, behaviour: Callable[..., Any], template: Handler | None = None
) -> Handler:
    """A handler of ``kind`` running ``behaviour``, with ``template``'s (de)serialisers.

    Without a template messages stay raw bytes -- right for aborting handlers, which never
    read the request of a caller that did not authenticate.
    """
    if template is None:
        return _FACTORIES[kind](behaviour)
    return _FACTORIES[kind](
        behaviour,
        request_deserializer=template.request_deserializer,
        response_serializer=template.response_serializer,
    )
