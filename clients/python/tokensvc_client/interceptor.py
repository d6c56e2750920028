"""Server interceptor for blocking gRPC servers: every call must carry a valid access token.

Usage::

    keys = JwksCache(TokenClient("tokensvc:50051", ca="ca.pem").get_keys)
    server = grpc.server(
        ThreadPoolExecutor(),
        interceptors=[AuthInterceptor(keys, issuer="https://tokensvc", audience="orders")],
    )

Handlers read the verified claims with :func:`~tokensvc_client.context.current_claims`.

gRPC runs server interceptors on its polling thread, which serves every connection. So
this interceptor decides there only what needs no I/O -- header checks, and verification
when the key cache is fresh -- and returns a pre-built aborting handler for a rejection.
When keys must be fetched first (cold cache, stale cache, unknown ``kid``), the decision
is finished in the handler's worker thread instead, so a slow or unreachable tokensvc
never stalls the whole server. The certificate binding of a bound token (RFC 8705) is
checked in the worker thread too, before the handler runs: only there is the call's TLS
peer known.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import Context
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from tokensvc_client._auth import (
    DEFAULT_EXEMPT,
    Authenticator,
    CallDecision,
    HandlerMemo,
    MethodPolicy,
    RevocationCheck,
    follow_key_events,
    step,
)
from tokensvc_client._chains import ActorChain, TransactionTokens, annotate_span
from tokensvc_client._rejection import Rejection
from tokensvc_client._stepup import StepUp
from tokensvc_client.context import Verified, context_with
from tokensvc_client.handlers import Handler, Kind, behaviour_of, handler_of_kind, kind_of
from tokensvc_client.jwks import JwksCache, KeyRequest
from tokensvc_client.verifier import DEFAULT_LEEWAY_SECONDS, Verifier

if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.ServerInterceptor

__all__ = ["AuthInterceptor"]

#: Produces the verified call inside the handler's thread, or aborts it through its context.
_Resolve = Callable[[grpc.ServicerContext], Verified]

#: Handlers wrapped for the claims of recent tokens (see HandlerMemo).
_WRAPPED_MAX = 1024


class AuthInterceptor(_ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED
    ``invalid token: <reason code>``; passes the claims of valid ones to the handler.

    Args:
        keys: the JWKS cache; its fetch callable is the only key source.
        issuer: the only accepted ``iss``.
        audience: this service's name; must be in a token's ``aud``.
        leeway: clock skew tolerated for ``nbf``/``iat``, seconds.
        clock: current UNIX time for claim checks; injectable for tests.
        exempt: full method names and prefixes (ending in "/") served without a token; by
            default gRPC health checking and reflection. Any other entry is a ValueError.
        revocation_check: ``claims -> bool``, True rejects with ``invalid token: revoked``.
            Runs for every call; must be fast.
        policy: ``(method, claims) -> Rejection | None`` per-method authorisation hook;
            a returned rejection's ``trailing_metadata`` is sent with it.
        step_up: ``{method or prefix: StepUp}``, RFC 9470 step-up requirements per method:
            full method names ("/pkg.Svc/Method") or prefixes ending in "/" (any other key,
            e.g. "/pkg.Svc", is a ValueError naming it); an exact entry wins over
            prefixes. A token lacking a required role gets PERMISSION_DENIED
            ``insufficient role`` (trailer ``tokensvc-reason: insufficient_role``); one
            failing the ``acr`` or ``max_auth_age`` requirement
            PERMISSION_DENIED ``insufficient user authentication`` (trailers
            ``tokensvc-reason: insufficient_user_authentication`` and a
            ``www-authenticate`` challenge with ``acr_values``/``max_age``). Checked after
            revocation, before ``policy``.
        require_binding: refuse tokens that are not bound to a client certificate with
            UNAUTHENTICATED ``invalid token: unbound``. Whatever this says, a bound token
            (``cnf`` ``x5t#S256``, RFC 8705) is only accepted over a connection whose TLS
            client certificate has that thumbprint, else ``invalid token:
            certificate_mismatch``. The binding is checked when the handler starts (the
            TLS peer is unknown before), so after ``step_up`` and ``policy``; unbound
            tokens cost nothing extra unless ``require_binding`` is set.
        trust_domain: verify the Transaction Token of a call (``txn-token`` metadata,
            draft-ietf-oauth-transaction-tokens-10) when it carries one: signature,
            ``typ`` ``txntoken+jwt``, ``aud`` this trust domain, expiry, and revocation of
            its session through ``revocation_check``; a bad one is UNAUTHENTICATED
            ``invalid txn-token: <reason code>``. Handlers read its claims with
            :func:`~tokensvc_client.context.current_transaction`; the
            :class:`~tokensvc_client.propagation.TransactionPropagator` forwards it.
            ``None`` (default): the entry is ignored.
        require_txn_token: methods and prefixes (as ``exempt``) refused without a
            Transaction Token (``invalid txn-token: missing_token``); needs
            ``trust_domain``.
        actor_chains: ``{method or prefix: ActorChain}``: the actor chains (RFC 8693
            ``act`` of exchanged tokens) each method accepts; others are PERMISSION_DENIED
            ``actor chain not accepted`` (trailer ``tokensvc-reason: actor_chain``).

    If no key set could ever be fetched, calls get UNAVAILABLE ``token keys unavailable``;
    if a hook raises, UNAVAILABLE ``authorization check failed`` (fail closed).
    """

    def __init__(
        self,
        keys: JwksCache,
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

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._auth.exempt:
            return handler
        decision = self._auth.decide_call(method, handler_call_details.invocation_metadata)
        outcome = self._step_without_io(decision)
        if isinstance(outcome, Rejection):
            return _aborting_handler(outcome, kind_of(handler))
        if isinstance(outcome, Verified):
            verified = outcome
            if not self._auth.checks_binding(verified.claims):  # the warm path: unbound
                return self._wrapped.wrapped(
                    handler, verified, lambda: _with_claims(handler, lambda _context: verified)
                )
            return _with_claims(handler, lambda context: self._bound(method, verified, context))
        pending = outcome

        def resolve(context: grpc.ServicerContext) -> Verified:
            result = self._step_with_io(decision, pending)
            if isinstance(result, Rejection):
                _abort(context, result)
            return self._bound(method, result, context)

        return _with_claims(handler, resolve)

    def _bound(self, method: str, verified: Verified, context: grpc.ServicerContext) -> Verified:
        """``verified`` if its certificate binding holds for the call, else abort."""
        if self._auth.checks_binding(verified.claims):
            rejection = self._auth.check_binding(method, verified.claims, context)
            if rejection is not None:
                _abort(context, rejection)
        return verified

    def _step_without_io(self, decision: CallDecision) -> Verified | Rejection | KeyRequest:
        """Run the decision as far as the cache answers without fetching."""
        outcome = step(decision, None)
        while isinstance(outcome, KeyRequest) and not self._keys.needs_fetch(outcome):
            outcome = step(decision, self._keys.cached(outcome))
        return outcome

    def _step_with_io(self, decision: CallDecision, request: KeyRequest) -> Verified | Rejection:
        """Finish the decision, fetching keys as needed (blocking)."""
        outcome: Verified | Rejection | KeyRequest = request
        while isinstance(outcome, KeyRequest):
            outcome = step(decision, self._keys.answer(outcome))
        return outcome


@functools.lru_cache(maxsize=256)
def _aborting_handler(rejection: Rejection, kind: Kind) -> Handler:
    """The handler answering ``rejection``, built once per rejection and RPC kind."""

    def abort(_request: Any, context: grpc.ServicerContext) -> NoReturn:
        _abort(context, rejection)

    return handler_of_kind(kind, abort)


def _abort(context: grpc.ServicerContext, rejection: Rejection) -> NoReturn:
    """End the call with ``rejection``, its trailing metadata included."""
    if rejection.trailing_metadata:
        context.set_trailing_metadata(rejection.trailing_metadata)
    context.abort(rejection.code, rejection.message)


def _context_for(verified: Verified) -> Context:
    """The handler's context: ``verified`` held, the transaction on the span."""
    ctx = context_with(verified)
    if verified.transaction is not None:
        annotate_span(verified.transaction.transaction_id)
    return ctx


def _with_claims(handler: Handler, resolve: _Resolve) -> Handler:
    """``handler`` with its behaviour run in a context holding the resolved claims.

    The context is created inside the worker thread that runs the behaviour and discarded
    with the call, so pooled threads never carry one caller's claims into the next call.
    """
    behaviour = behaviour_of(handler)
    if handler.response_streaming:

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            ctx = _context_for(resolve(context))
            yield from _iterate_in(ctx, ctx.run(behaviour, request, context))

        return handler_of_kind(kind_of(handler), streaming, handler)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        return _context_for(resolve(context)).run(behaviour, request, context)

    return handler_of_kind(kind_of(handler), unary, handler)


def _iterate_in(ctx: Context, responses: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``responses`` with every step of the handler's generator run in ``ctx``."""
    iterator = ctx.run(iter, responses)
    while True:
        try:
            item = ctx.run(next, iterator)
        except StopIteration:
            return
        yield item
