"""Server interceptor for ``grpc.aio`` servers: every call must carry a valid access token.

The asyncio twin of :class:`~tokensvc_client.interceptor.AuthInterceptor`: same arguments,
same decisions (:mod:`tokensvc_client._auth`), keys from an
:class:`~tokensvc_client.jwks.AsyncJwksCache`. Usage::

    keys = AsyncJwksCache(AsyncTokenClient("tokensvc:50051", ca="ca.pem").get_keys)
    server = grpc.aio.server(
        interceptors=[AioAuthInterceptor(keys, issuer="https://tokensvc", audience="orders")]
    )

A fetch is awaited, so it never blocks the event loop; the whole decision is made before
the handler is chosen, and a rejected call gets a pre-built aborting handler.

Handlers must be asyncio handlers (coroutine functions, or async generators for streamed
responses). Each call runs in its own task, where the claims are set for the handler.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from tokensvc_client._auth import (
    DEFAULT_EXEMPT,
    Authenticator,
    Handler,
    Kind,
    MethodPolicy,
    Rejection,
    RevocationCheck,
    behaviour_of,
    handler_of_kind,
    kind_of,
    step,
)
from tokensvc_client.context import claims_set
from tokensvc_client.jwks import AsyncJwksCache, KeyRequest
from tokensvc_client.verifier import DEFAULT_LEEWAY_SECONDS, Claims, Verifier

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Context = grpc.aio.ServicerContext

__all__ = ["AioAuthInterceptor"]


class AioAuthInterceptor(_ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED
    ``invalid token: <reason code>``; passes the claims of valid ones to the handler.

    Arguments as for :class:`~tokensvc_client.interceptor.AuthInterceptor`, with ``keys``
    an :class:`~tokensvc_client.jwks.AsyncJwksCache`. The hooks are plain functions called
    on the event loop: they must not block.
    """

    def __init__(
        self,
        keys: AsyncJwksCache,
        *,
        issuer: str,
        audience: str,
        leeway: int = DEFAULT_LEEWAY_SECONDS,
        clock: Callable[[], float] = time.time,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        revocation_check: RevocationCheck | None = None,
        policy: MethodPolicy | None = None,
    ) -> None:
        self._keys = keys
        self._auth = Authenticator(
            Verifier(issuer, audience, leeway=leeway, clock=clock),
            exempt=exempt,
            revocation_check=revocation_check,
            policy=policy,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._auth.exempt:
            return handler  # type: ignore[return-value]  # None: gRPC answers UNIMPLEMENTED
        decision = self._auth.decide(method, handler_call_details.invocation_metadata)
        outcome = step(decision, None)
        while isinstance(outcome, KeyRequest):
            outcome = step(decision, await self._keys.answer(outcome))
        if isinstance(outcome, Rejection):
            return _aborting_handler(outcome, kind_of(handler))
        return _with_claims(handler, outcome)


@functools.lru_cache(maxsize=256)
def _aborting_handler(rejection: Rejection, kind: Kind) -> Handler:
    """The handler answering ``rejection``, built once per rejection and RPC kind."""

    async def abort(_request: Any, context: _Context) -> NoReturn:
        await context.abort(rejection.code, rejection.message)

    return handler_of_kind(kind, abort)


def _with_claims(handler: Handler, claims: Claims) -> Handler:
    """``handler`` with ``claims`` set around its behaviour, inside the call's own task."""
    behaviour = behaviour_of(handler)
    if handler.response_streaming and not inspect.iscoroutinefunction(behaviour):

        async def streaming(request: Any, context: _Context) -> AsyncIterator[Any]:
            with claims_set(claims):
                async for response in behaviour(request, context):
                    yield response

        return handler_of_kind(kind_of(handler), streaming, handler)

    async def call(request: Any, context: _Context) -> Any:
        with claims_set(claims):
            return await behaviour(request, context)

    return handler_of_kind(kind_of(handler), call, handler)
