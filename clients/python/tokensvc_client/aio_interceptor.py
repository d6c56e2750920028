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
responses). Each call runs in its own task, where the claims are set for the handler --
after the certificate binding of a bound token (RFC 8705) is checked there, where the
call's TLS peer is known.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from tokensvc_client._auth import (
    DEFAULT_EXEMPT,
    Authenticator,
    HandlerMemo,
    MethodPolicy,
    RevocationCheck,
    follow_key_events,
    step,
)
from tokensvc_client._chains import ActorChain, TransactionTokens, annotate_span
from tokensvc_client._rejection import Rejection
from tokensvc_client._stepup import StepUp
from tokensvc_client.context import Verified, claims_set
from tokensvc_client.handlers import Handler, Kind, behaviour_of, handler_of_kind, kind_of
from tokensvc_client.jwks import AsyncJwksCache, KeyRequest
from tokensvc_client.verifier import DEFAULT_LEEWAY_SECONDS, Verifier

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _Context = grpc.aio.ServicerContext

__all__ = ["AioAuthInterceptor"]

#: Handlers wrapped for the claims of recent tokens (see HandlerMemo).
_WRAPPED_MAX = 1024
#: The certificate-binding check of a call: its context -> a rejection or None to accept.
_BindingCheck = Callable[[_Context], Rejection | None]


class AioAuthInterceptor(_ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED
    ``invalid token: <reason code>``; passes the claims of valid ones to the handler.

    Arguments as for :class:`~tokensvc_client.interceptor.AuthInterceptor` (including
    ``step_up``, ``require_binding``, ``trust_domain``, ``require_txn_token`` and
    ``actor_chains``, with the same rejections and trailers), with
    ``keys`` an :class:`~tokensvc_client.jwks.AsyncJwksCache`. The hooks are plain
    functions called on the event loop: they must not block.
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
        step_up: Mapping[str, StepUp] | None = None,
        require_binding: bool = False,
        trust_domain: str | None = None,
        require_txn_token: Iterable[str] = (),
        actor_chains: Mapping[str, ActorChain] | None = None,
    ) -> None:
        self._keys = keys
        self._auth = Authenticator(
            Verifier(issuer, audience, leeway=leeway, clock=clock),
            exempt=exempt,
            revocation_check=revocation_check,
            policy=policy,
            step_up=step_up,
            require_binding=require_binding,
            transactions=TransactionTokens.of(
                trust_domain, require_txn_token, issuer=issuer, leeway=leeway, clock=clock
            ),
            actor_chains=actor_chains,
        )
        follow_key_events(revocation_check, keys)  # new keys verify within a second
        self._wrapped = HandlerMemo(_WRAPPED_MAX)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler: Handler | None = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._auth.exempt:
            return handler  # type: ignore[return-value]  # None: gRPC answers UNIMPLEMENTED
        decision = self._auth.decide_call(method, handler_call_details.invocation_metadata)
        outcome = step(decision, None)
        while isinstance(outcome, KeyRequest):
            outcome = step(decision, await self._keys.answer(outcome))
        if isinstance(outcome, Rejection):
            return _aborting_handler(outcome, kind_of(handler))
        verified = outcome
        if self._auth.checks_binding(verified.claims):  # never for unbound tokens by default
            check = functools.partial(self._auth.check_binding, method, verified.claims)
            return _with_claims(handler, verified, check)
        return self._wrapped.wrapped(
            handler, verified, lambda: _with_claims(handler, verified, None)
        )


@functools.lru_cache(maxsize=256)
def _aborting_handler(rejection: Rejection, kind: Kind) -> Handler:
    """The handler answering ``rejection``, built once per rejection and RPC kind."""

    async def abort(_request: Any, context: _Context) -> NoReturn:
        await _abort(context, rejection)

    return handler_of_kind(kind, abort)


async def _abort(context: _Context, rejection: Rejection) -> NoReturn:
    """End the call with ``rejection``, its trailing metadata included."""
    await context.abort(rejection.code, rejection.message, rejection.trailing_metadata)


async def _check(context: _Context, check: _BindingCheck) -> None:
    """Abort the call if its certificate binding fails."""
    rejection = check(context)
    if rejection is not None:
        await _abort(context, rejection)


def _with_claims(handler: Handler, verified: Verified, check: _BindingCheck | None) -> Handler:
    """``handler`` with ``verified`` set around its behaviour, inside the call's own task,
    once ``check`` (if any) accepted the call (the transaction id put on the span)."""
    txn = verified.transaction.transaction_id if verified.transaction is not None else None
    behaviour = behaviour_of(handler)
    if handler.response_streaming and not inspect.iscoroutinefunction(behaviour):

        async def streaming(request: Any, context: _Context) -> AsyncIterator[Any]:
            if check is not None:
                await _check(context, check)
            if txn is not None:
                annotate_span(txn)
            with claims_set(verified):
                async for response in behaviour(request, context):
                    yield response

        return handler_of_kind(kind_of(handler), streaming, handler)

    async def call(request: Any, context: _Context) -> Any:
        if check is not None:
            await _check(context, check)
        if txn is not None:
            annotate_span(txn)
        with claims_set(verified):
            return await behaviour(request, context)

    return handler_of_kind(kind_of(handler), call, handler)
