"""The interceptors' decision, written once: call metadata -> verified claims or a rejection.

:meth:`Authenticator.decide` is a generator in the sans-I/O style: whenever it needs keys it
yields a :class:`~tokensvc_client.jwks.KeyRequest` and is sent back a ``KeySet`` (or
``None``). The blocking interceptor answers from a :class:`~tokensvc_client.jwks.JwksCache`,
the asyncio one awaits an :class:`~tokensvc_client.jwks.AsyncJwksCache`; neither repeats a
rule. The decision covers everything the call's metadata tells: the token, revocation,
step-up requirements (:class:`StepUp`, RFC 9470) and the method policy. What needs the
call's TLS peer -- certificate binding (RFC 8705) -- is decided by
:meth:`Authenticator.check_binding` once the handler runs, where the peer is known.
A call's Transaction Token (``txn-token`` metadata) and its access token's actor chain
are decided here too (:mod:`tokensvc_client._chains`); a decision's success is a
:class:`~tokensvc_client.context.Verified`, what the handler's context then holds.

Its parts live next door: rejections in :mod:`tokensvc_client._rejection`, step-up
requirements in :mod:`tokensvc_client._stepup`, method names in
:mod:`tokensvc_client._handlers`, handler shapes in :mod:`tokensvc_client.handlers`; import
their names from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from tokensvc_client import _metrics
from tokensvc_client._chains import (
    ACTOR_CHAIN_DENIED,
    ActorChain,
    ActorChainTable,
    TransactionTokens,
    invalid_txn_token,
)
from tokensvc_client._handlers import MethodFilter
from tokensvc_client._rejection import (
    CERTIFICATE_MISMATCH,
    CHECK_FAILED,
    INSUFFICIENT_ROLE,
    KEYS_UNAVAILABLE,
    UNBOUND,
    Rejection,
    reason_of,
)
from tokensvc_client._stepup import StepUp, StepUpTable, insufficient_user_authentication
from tokensvc_client.cache import BoundedCache
from tokensvc_client.context import Verified
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.handlers import Handler
from tokensvc_client.jwks import CURRENT, KeyRequest
from tokensvc_client.peer import holds_bound_certificate, peer_of
from tokensvc_client.verifier import Claims, KeySet, TransactionClaims, Verifier
from tokensvc_client.wire import Metadata, bearer_token, txn_token

__all__ = [
    "DEFAULT_EXEMPT",
    "Authenticator",
    "CallDecision",
    "Decision",
    "HandlerMemo",
    "HasAuthContext",
    "MethodPolicy",
    "RevocationCheck",
    "follow_key_events",
    "step",
]

log = logging.getLogger("tokensvc_client.auth")

#: gRPC health checking and server reflection (both versions) need no token.
DEFAULT_EXEMPT: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


#: Per-method policy hook: ``(full method name, claims) -> Rejection or None to allow``.
MethodPolicy = Callable[[str, Claims], Rejection | None]
#: Revocation hook: ``claims -> True if revoked``. Called on the serving thread or event
#: loop for every call, so it must be fast and must not block (e.g. a local set fed by a
#: revocation feed).
RevocationCheck = Callable[[Claims], bool]
#: What :meth:`Authenticator.decide` yields, is sent, and returns.
Decision = Generator[KeyRequest, KeySet | None, Claims | Rejection]
#: :meth:`Authenticator.decide_call`'s: the whole verified call (what the interceptors use).
CallDecision = Generator[KeyRequest, KeySet | None, Verified | Rejection]
_Outcome = TypeVar("_Outcome")
#: The Transaction Token part of a decision: its claims and token, none, or a rejection.
_TxnDecision = Generator[
    KeyRequest, KeySet | None, tuple[TransactionClaims, str] | Rejection | None
]


class HandlerMemo(BoundedCache[tuple[int, int], tuple[Handler, Verified, Handler]]):
    """Handlers already wrapped for a verified call: a warm call reuses the wrapper instead
    of building one (the same :class:`Verified` comes back while its tokens stay valid:
    see :meth:`Authenticator.verified`)."""

    def wrapped(self, handler: Handler, claims: Verified, build: Callable[[], Handler]) -> Handler:
        key = (id(handler), id(claims))
        hit = self.get(key)
        if hit is not None and hit[0] is handler and hit[1] is claims:  # ids not reused
            return hit[2]
        made = build()
        self.put(key, (handler, claims, made))  # holding both keeps their ids unique
        return made


_OTHER_ACR = "A different authentication level is required"
_RECENT_AUTH = "More recent authentication is required"


class HasAuthContext(Protocol):
    """A blocking or asyncio ``grpc.ServicerContext``: all the binding check needs."""

    def auth_context(self) -> Any: ...


class Authenticator:
    """Everything the interceptors decide, with the hooks they offer.

    Args:
        verifier: checks signature and claims (issuer and this service's audience).
        exempt: methods called without a token; see :class:`MethodFilter`.
        revocation_check: optional; see :data:`RevocationCheck`.
        policy: optional per-method policy on verified claims; see :data:`MethodPolicy`.
        step_up: optional step-up requirements by method or prefix; see :class:`StepUp`
            and :class:`StepUpTable`. Checked after revocation, before ``policy``.
        require_binding: refuse tokens not bound to a client certificate (``unbound``);
            see :meth:`check_binding`.
        transactions: optional; verify the ``txn-token`` metadata entry (see
            :class:`~tokensvc_client._chains.TransactionTokens`).
        actor_chains: optional actor-chain requirements by method or prefix; see
            :class:`~tokensvc_client._chains.ActorChain`. Checked after step-up.
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        revocation_check: RevocationCheck | None = None,
        policy: MethodPolicy | None = None,
        step_up: Mapping[str, StepUp] | None = None,
        require_binding: bool = False,
        transactions: TransactionTokens | None = None,
        actor_chains: Mapping[str, ActorChain] | None = None,
    ) -> None:
        if verifier.audience is None:
            raise ValueError("an interceptor's verifier must check an audience")
        self.verifier = verifier
        self.exempt = MethodFilter(exempt)
        self.revocation_check = revocation_check
        self.policy = policy
        table = StepUpTable(step_up or {})
        self.step_up = table if len(table) else None
        self.require_binding = bool(require_binding)
        self.transactions = transactions
        # txn-token values a verifier accepted (their form is not checked again); only
        # verified values go in, evicting the oldest: a client cannot fill it
        self._txn_values: BoundedCache[str, bool] = BoundedCache(verifier.cache_size)
        chains = ActorChainTable(actor_chains or {})
        self.actor_chains = chains if len(chains) else None
        # one Verified per (claims, transaction claims) objects, as long as the verifiers'
        # caches return the same ones: warm calls reuse their wrapped handler
        self._verified: BoundedCache[tuple[int, int], Verified] = BoundedCache(verifier.cache_size)
        # a Transaction Token's revocation view, per (cached) claims object
        self._revocation_views: BoundedCache[int, tuple[TransactionClaims, Claims]] = BoundedCache(
            verifier.cache_size
        )
        # the decision for an exact authorization value: value -> token here, token ->
        # claims in the verifier's cache (which re-checks exp and the key on every hit);
        # revocation, step-up and policy are decided on every call
        self._tokens: BoundedCache[str, str] = BoundedCache(verifier.cache_size)

    def _token(self, metadata: Metadata) -> str:
        """:func:`bearer_token`, remembered per exact value of a lone header."""
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return bearer_token(metadata)  # raises the right reason
        token = self._tokens.get(values[0])
        if token is None:
            token = bearer_token(metadata)
            self._tokens.put(values[0], token)
        return token

    @staticmethod
    def _count(rejection: Rejection) -> None:
        _metrics.TOTALS.refused[reason_of(rejection)] += 1

    def decide(self, method: str, metadata: Metadata) -> Decision:
        """Decide one call; a generator that yields key requests (see the module doc) and
        returns the access token's claims or a rejection."""
        outcome = yield from self.decide_call(method, metadata)
        return outcome if isinstance(outcome, Rejection) else outcome.claims

    def decide_call(self, method: str, metadata: Metadata) -> CallDecision:
        """:meth:`decide`, returning the whole :class:`Verified` call (its Transaction Token
        too): what the handler's context holds."""
        outcome = yield from self._decide(method, metadata)
        if isinstance(outcome, Rejection):
            self._count(outcome)
        elif not self.checks_binding(outcome.claims):  # else check_binding counts it
            _metrics.TOTALS.allowed += 1
        return outcome

    def _decide(self, method: str, metadata: Metadata) -> CallDecision:
        try:
            token = self._token(metadata)
            keys = yield CURRENT
            if keys is None:
                log.warning("rejected call to %s: no JWK Set available", method)
                return KEYS_UNAVAILABLE
            try:
                claims = self.verifier.verify(token, keys)
            except InvalidToken as err:
                if err.reason is not Reason.UNKNOWN_KEY:
                    raise
                newer = yield KeyRequest(lacking=keys)
                if newer is None:
                    raise
                keys = newer
                claims = self.verifier.verify(token, keys)
            if self._revoked(claims):
                raise InvalidToken(Reason.REVOKED)
        except InvalidToken as err:
            # The log gets the reason and its detail (never the token); the caller, the code.
            log.info("rejected call to %s: %s", method, err)
            return Rejection.invalid_token(err.reason)
        except _HookFailed:
            return CHECK_FAILED
        transaction = None
        if self.transactions is not None:
            found = yield from self._transaction(self.transactions, method, metadata, keys)
            if isinstance(found, Rejection):
                return found
            transaction = found
        if self.step_up is not None:
            denial = self._check_step_up(method, claims)
            if denial is not None:
                return denial
        if self.actor_chains is not None:
            required = self.actor_chains.lookup(method)
            if required is not None and not required.accepts(claims):
                log.info("denied call to %s: actor chain %s", method, claims.actors)
                return ACTOR_CHAIN_DENIED
        outcome = self._apply_policy(method, claims)
        if isinstance(outcome, Rejection):
            return outcome
        return self.verified(outcome, token, transaction)

    def _transaction(
        self, rules: TransactionTokens, method: str, metadata: Metadata, keys: KeySet
    ) -> _TxnDecision:
        """The call's Transaction Token: verified, not revoked (its session), or required."""
        try:
            token = txn_token(metadata, self._txn_values)
            if token is None:
                if method in rules.required:
                    raise InvalidToken(Reason.MISSING)
                return None
            try:
                claims = rules.verifier.verify(token, keys)
            except InvalidToken as err:
                if err.reason is not Reason.UNKNOWN_KEY:
                    raise
                newer = yield KeyRequest(lacking=keys)
                if newer is None:
                    raise
                claims = rules.verifier.verify(token, newer)
            if self.revocation_check is not None and self._revoked(self._view(claims)):
                raise InvalidToken(Reason.REVOKED)
            self._txn_values.put(token, True)
        except InvalidToken as err:
            log.info("rejected call to %s: txn-token %s", method, err)
            return invalid_txn_token(err.reason)
        except _HookFailed:
            return CHECK_FAILED
        return claims, token

    def _view(self, claims: TransactionClaims) -> Claims:
        """:meth:`TransactionClaims.for_revocation`, built once per claims object."""
        hit = self._revocation_views.get(id(claims))
        if hit is not None and hit[0] is claims:
            return hit[1]
        view = claims.for_revocation()
        self._revocation_views.put(id(claims), (claims, view))
        return view

    def verified(
        self,
        claims: Claims,
        token: str,
        transaction: tuple[TransactionClaims, str] | None,
    ) -> Verified:
        """The :class:`Verified` of a call, the same object for the same (cached) claims."""
        txn = transaction[0] if transaction is not None else None
        key = (id(claims), id(txn))
        hit = self._verified.get(key)
        if hit is not None and hit.claims is claims and hit.transaction is txn:
            return hit
        made = Verified(claims, token, txn, transaction[1] if transaction is not None else None)
        self._verified.put(key, made)  # holding both objects keeps their ids unique
        return made

    def _check_step_up(self, method: str, claims: Claims) -> Rejection | None:
        required = self.step_up.lookup(method) if self.step_up is not None else None
        if required is None:
            return None
        denial: Rejection | None = None
        if not required.roles.issubset(claims.roles):
            denial = INSUFFICIENT_ROLE
        elif required.acr and claims.acr not in required.acr:
            denial = insufficient_user_authentication(required, _OTHER_ACR)
        elif required.max_auth_age is not None and (
            claims.auth_time is None
            or self.verifier.clock() - claims.auth_time > required.max_auth_age
        ):
            denial = insufficient_user_authentication(required, _RECENT_AUTH)
        if denial is not None:
            log.info("denied call to %s for sub=%s: %s", method, claims.subject, denial.message)
        return denial

    def checks_binding(self, claims: Claims) -> bool:
        """Whether :meth:`check_binding` has anything to check for ``claims``: false for an
        unbound token without ``require_binding``, so such calls never read their peer."""
        return self.require_binding or bool(claims.cnf_x5t_s256)

    def check_binding(
        self, method: str, claims: Claims, context: HasAuthContext
    ) -> Rejection | None:
        """RFC 8705 proof of possession: a token bound to a certificate (``cnf``
        ``x5t#S256``) is only accepted over a connection authenticated with that client
        certificate; with ``require_binding`` an unbound token is refused.

        Returns:
            ``None`` to accept; ``invalid token: certificate_mismatch`` or
            ``invalid token: unbound`` (UNAUTHENTICATED) to refuse.
        """
        bound = claims.cnf_x5t_s256
        if not bound:
            if not self.require_binding:
                return None
            log.info("rejected call to %s: %s", method, Reason.UNBOUND.value)
            self._count(UNBOUND)
            return UNBOUND
        if not holds_bound_certificate(bound, peer_of(context).thumbprint):
            log.info(
                "rejected call to %s for sub=%s: %s",
                method,
                claims.subject,
                Reason.CERTIFICATE_MISMATCH.value,
            )
            self._count(CERTIFICATE_MISMATCH)
            return CERTIFICATE_MISMATCH
        _metrics.TOTALS.allowed += 1
        return None

    def _revoked(self, claims: Claims) -> bool:
        if self.revocation_check is None:
            return False
        try:
            return bool(self.revocation_check(claims))
        except Exception as err:
            # no traceback: a stale feed failing closed raises on every call
            log.warning("revocation check failed for sid=%s: %r", claims.session_id, err)
            raise _HookFailed from err

    def _apply_policy(self, method: str, claims: Claims) -> Claims | Rejection:
        if self.policy is None:
            return claims
        try:
            denial = self.policy(method, claims)
        except Exception:
            log.exception("method policy failed for %s", method)
            return CHECK_FAILED
        if denial is not None:
            log.info("denied call to %s for sub=%s: %s", method, claims.subject, denial.message)
            return denial
        return claims


def follow_key_events(revocation_check: RevocationCheck | None, keys: object) -> None:
    """If ``revocation_check`` is a revocation feed, have it tell the JWKS cache ``keys`` of
    key revocations (see :meth:`tokensvc_client.RevocationFeed.follow_keys`)."""
    follow = getattr(revocation_check, "follow_keys", None)
    if callable(follow):
        follow(keys)


class _HookFailed(Exception):
    """A hook raised; the call is refused (fail closed)."""


def step(
    decision: Generator[KeyRequest, KeySet | None, _Outcome], reply: KeySet | None
) -> _Outcome | KeyRequest:
    """Advance a decision (``reply`` ``None`` starts it): its next key request, or its
    result."""
    try:
        return decision.send(reply)
    except StopIteration as done:
        result: _Outcome = done.value
        return result
