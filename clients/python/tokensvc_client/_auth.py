"""The interceptors' decision, written once: call metadata -> verified claims or a rejection.

:meth:`Authenticator.decide` is a generator in the sans-I/O style: whenever it needs keys it
yields a :class:`~tokensvc_client.jwks.KeyRequest` and is sent back a ``KeySet`` (or
``None``). The blocking interceptor answers from a :class:`~tokensvc_client.jwks.JwksCache`,
the asyncio one awaits an :class:`~tokensvc_client.jwks.AsyncJwksCache`; neither repeats a
rule. Also here: what the two interceptors share about method handlers (their kind, and a
handler of the same kind with another behaviour).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.jwks import CURRENT, KeyRequest
from tokensvc_client.verifier import Claims, KeySet, Verifier

log = logging.getLogger("tokensvc_client.auth")

#: gRPC health checking and server reflection need no token.
DEFAULT_EXEMPT: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Metadata = Sequence[tuple[str, str | bytes]] | None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a call is refused: the status code and the whole message the caller sees."""

    code: grpc.StatusCode
    message: str

    @classmethod
    def invalid_token(cls, reason: Reason) -> Rejection:
        """UNAUTHENTICATED with nothing but the stable reason code (SPEC.md section 10)."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {reason.value}")


#: No key set could be fetched yet: not the caller's fault, and worth a retry.
KEYS_UNAVAILABLE = Rejection(grpc.StatusCode.UNAVAILABLE, "token keys unavailable")
#: A hook (revocation check, method policy) raised: fail closed.
CHECK_FAILED = Rejection(grpc.StatusCode.UNAVAILABLE, "authorization check failed")

#: Per-method policy hook: ``(full method name, claims) -> Rejection or None to allow``.
MethodPolicy = Callable[[str, Claims], Rejection | None]
#: Revocation hook: ``claims -> True if revoked``. Called on the serving thread or event
#: loop for every call, so it must be fast and must not block (e.g. a local set fed by a
#: revocation feed).
RevocationCheck = Callable[[Claims], bool]
#: What :meth:`Authenticator.decide` yields, is sent, and returns.
Decision = Generator[KeyRequest, KeySet | None, Claims | Rejection]


def bearer_token(metadata: Metadata) -> str:
    """The token of the one ``authorization: Bearer <token>`` header (scheme in any case).

    Raises:
        InvalidToken: ``MISSING`` without the header; ``MALFORMED`` for several headers,
            another scheme or a value that is not ``Bearer`` + one token.
    """
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        raise InvalidToken(Reason.MISSING)
    if len(values) > 1:
        raise InvalidToken(Reason.MALFORMED, "more than one authorization header")
    value = values[0]
    if not isinstance(value, str):
        raise InvalidToken(Reason.MALFORMED, "binary authorization header")
    scheme, _, token = value.partition(" ")
    token = token.lstrip(" ")
    if scheme.lower() != "bearer":
        raise InvalidToken(Reason.MALFORMED, "not a bearer token")
    if token.split() != [token]:  # empty, or whitespace inside (str.split runs in C)
        raise InvalidToken(Reason.MALFORMED, "bearer value is not one token")
    return token


class MethodFilter:
    """A set of full method names ("/pkg.Service/Method") and prefixes.

    An entry ending in "/" or "." is a prefix ("/grpc.health.v1.Health/" covers every
    method of that service); any other entry matches only exactly, so exempting
    "/pkg.Svc/Get" never exempts "/pkg.Svc/GetSecret".
    """

    def __init__(self, entries: Iterable[str]) -> None:
        if isinstance(entries, str):
            raise TypeError("pass a collection of method names, not one string")
        entries = tuple(entries)
        if not all(e.startswith("/") for e in entries):
            raise ValueError("method names and prefixes must start with '/'")
        self._exact = frozenset(e for e in entries if not e.endswith(("/", ".")))
        self._prefixes = tuple(e for e in entries if e.endswith(("/", ".")))

    def __contains__(self, method: object) -> bool:
        return isinstance(method, str) and (
            method in self._exact or method.startswith(self._prefixes)
        )


class Authenticator:
    """Everything the interceptors decide, with the hooks they offer.

    Args:
        verifier: checks signature and claims (issuer and this service's audience).
        exempt: methods called without a token; see :class:`MethodFilter`.
        revocation_check: optional; see :data:`RevocationCheck`.
        policy: optional per-method policy on verified claims; see :data:`MethodPolicy`.
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        revocation_check: RevocationCheck | None = None,
        policy: MethodPolicy | None = None,
    ) -> None:
        if verifier.audience is None:
            raise ValueError("an interceptor's verifier must check an audience")
        self.verifier = verifier
        self.exempt = MethodFilter(exempt)
        self.revocation_check = revocation_check
        self.policy = policy

    def decide(self, method: str, metadata: Metadata) -> Decision:
        """Decide one call; a generator that yields key requests (see the module doc)."""
        try:
            token = bearer_token(metadata)
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
        return self._apply_policy(method, claims)

    def _revoked(self, claims: Claims) -> bool:
        if self.revocation_check is None:
            return False
        try:
            return bool(self.revocation_check(claims))
        except Exception as err:
            log.exception("revocation check failed for sid=%s", claims.session_id)
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
