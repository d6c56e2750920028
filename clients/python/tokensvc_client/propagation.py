"""Outbound propagation of the current call's Transaction Token (docs/call-chains.md).

A service behind :class:`~tokensvc_client.AuthInterceptor` (or the asyncio one) with a
``trust_domain`` holds the inbound Transaction Token in its handler's context. Channels to
the next hop built with these client interceptors add it to every outgoing call as
``txn-token`` metadata -- unmodified, as the draft asks -- so a handler that calls
downstream services propagates the transaction with no code of its own::

    downstream = grpc.intercept_channel(channel(target, ...), TransactionPropagator())
    aio = grpc.aio.secure_channel(target, creds, interceptors=aio_transaction_propagators())

A call that sets ``txn-token`` itself keeps its own; outside a call with a Transaction
Token nothing is added. :func:`~tokensvc_client.context.sending_txn_token` sends another
token for a block (a narrower replacement, or the one the edge just minted).

Call credentials cannot do this: gRPC runs their plugins on its own threads, where the
handler's context is not visible. Client interceptors run in the calling thread or task.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from tokensvc_client.context import outgoing_txn_token
from tokensvc_client.wire import TXN_TOKEN_HEADER

__all__ = [
    "AioTransactionPropagator",
    "TransactionPropagator",
    "aio_transaction_propagators",
    "with_txn_token",
]

if TYPE_CHECKING:
    _UU = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _US = grpc.UnaryStreamClientInterceptor[Any, Any]
    _SU = grpc.StreamUnaryClientInterceptor[Any, Any]
    _SS = grpc.StreamStreamClientInterceptor[Any, Any]
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioUS = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _AioSU = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _AioSS = grpc.aio.StreamStreamClientInterceptor[Any, Any]
else:
    _UU = grpc.UnaryUnaryClientInterceptor
    _US = grpc.UnaryStreamClientInterceptor
    _SU = grpc.StreamUnaryClientInterceptor
    _SS = grpc.StreamStreamClientInterceptor
    _AioUU = grpc.aio.UnaryUnaryClientInterceptor
    _AioUS = grpc.aio.UnaryStreamClientInterceptor
    _AioSU = grpc.aio.StreamUnaryClientInterceptor
    _AioSS = grpc.aio.StreamStreamClientInterceptor

_Metadata = Sequence[tuple[str, str | bytes]]


def with_txn_token(metadata: _Metadata | None) -> list[tuple[str, str | bytes]] | None:
    """``metadata`` plus the outgoing Transaction Token, if there is one and the call does
    not carry one already; ``None`` when nothing changes."""
    token = outgoing_txn_token()
    if token is None:
        return None
    current = list(metadata or ())
    if any(key.lower() == TXN_TOKEN_HEADER for key, _ in current):
        return None
    current.append((TXN_TOKEN_HEADER, token))
    return current


class _CallDetails(grpc.ClientCallDetails):
    """A ``grpc.ClientCallDetails`` with other metadata (gRPC's is abstract)."""

    def __init__(self, details: grpc.ClientCallDetails, metadata: _Metadata) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = tuple(metadata)
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


def _details(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    metadata = with_txn_token(details.metadata)
    if metadata is None:
        return details
    return _CallDetails(details, metadata)


class TransactionPropagator(_UU, _US, _SU, _SS):
    """Blocking-channel client interceptor adding the outgoing Transaction Token (see the
    module doc): ``grpc.intercept_channel(channel, TransactionPropagator())``."""

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(_details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(_details(client_call_details), request)

    def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(_details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: Iterator[Any],
    ) -> Any:
        return continuation(_details(client_call_details), request_iterator)


def _aio_details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = with_txn_token(tuple(details.metadata or ()))
    if metadata is None:
        return details
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


class AioTransactionPropagator(_AioUU):
    """asyncio-channel client interceptor for unary-unary calls (grpc.aio files each
    interceptor under one RPC kind: :func:`aio_transaction_propagators` gives all four)."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request)


class _AioUnaryStream(_AioUS):
    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request)


class _AioStreamUnary(_AioSU):
    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request_iterator)


class _AioStreamStream(_AioSS):
    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: Any,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(_aio_details(client_call_details), request_iterator)


def aio_transaction_propagators() -> list[Any]:
    """The ``interceptors=`` of a ``grpc.aio`` channel that propagates Transaction Tokens
    on calls of every kind."""
    return [AioTransactionPropagator(), _AioUnaryStream(), _AioStreamUnary(), _AioStreamStream()]
