"""The interceptors' decision, written once: call metadata -> verified claims or a rejection.

:meth:`Authenticator.decide` is a generator in the sans-I/O style: whenever it needs keys it
yields a :class:`~tokensvc_client.jwks.KeyRequest` and is sent back a ``KeySet`` (or
``None``). The blocking interceptor answers from a :class:`~tokensvc_client.jwks.JwksCache`,
the asyncio one awaits an :class:`~tokensvc_client.jwks.AsyncJwksCache`; neither repeats a
rule. The decision covers everything the call's metadata tells: the token, revocation,
step-up requirements (:class:`StepUp`, RFC 9470) and the method policy. What needs the
call's TLS peer -- certificate binding (RFC 8705) -- is decided by
:meth:`Authenticator.check_binding` once the handler runs, where the peer is known.

Its parts live next door: rejections in :mod:`tokensvc_client._rejection`, step-up
requirements in :mod:`tokensvc_client._stepup`, method names and handlers in
:mod:`tokensvc_client._handlers`; import their names from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any, Protocol

from tokensvc_client import _metrics
from tokensvc_client._handlers import Handler, MethodFilter
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
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.jwks import CURRENT, KeyRequest
from tokensvc_client.peer import holds_bound_certificate, peer_of
from tokensvc_client.verifier import Claims, KeySet, Verifier
from tokensvc_client.wire import Metadata, bearer_token

__all__ = [
    "DEFAULT_EXEMPT",
    "Authenticator",
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


class HandlerMemo(BoundedCache[tuple[int, int], tuple[Handler, Claims, Handler]]):
    """Handlers already wrapped for a verified token's claims: a warm call reuses the
    wrapper instead of building one (the same claims object comes back from the
    verifier's cache while the token stays valid)."""

    def wrapped(self, handler: Handler, claims: Claims, build: Callable[[], Handler]) -> Handler:
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
        """Decide one call; a generator that yields key requests (see the module doc)."""
        outcome = yield from self._decide(method, metadata)
        if isinstance(outcome, Rejection):
            self._count(outcome)
        elif not self.checks_binding(outcome):  # else check_binding counts it
            _metrics.TOTALS.allowed += 1
        return outcome

    def _decide(self, method: str, metadata: Metadata) -> Decision:
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
                claims = self.verifier.verify(token, newer)
            if self._revoked(claims):
                raise InvalidToken(Reason.REVOKED)
        except InvalidToken as err:
            # The log gets the reason and its detail (never the token); the caller, the code.
            log.info("rejected call to %s: %s", method, err)
            return Rejection.invalid_token(err.reason)
        except _HookFailed:
            return CHECK_FAILED
        if self.step_up is not None:
            denial = self._check_step_up(method, claims)
            if denial is not None:
                return denial
        return self._apply_policy(method, claims)

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


def step(decision: Decision, reply: KeySet | None) -> Claims | Rejection | KeyRequest:
    """Advance a decision (``reply`` ``None`` starts it): its next key request, or its
    result."""
    try:
        return decision.send(reply)
    except StopIteration as done:
        result: Claims | Rejection = done.value
        return result
