"""The interceptors' decision, written once: call metadata -> verified claims or a rejection.

:meth:`Authenticator.decide` is a generator in the sans-I/O style: whenever it needs keys it
yields a :class:`~tokensvc_client.jwks.KeyRequest` and is sent back a ``KeySet`` (or
``None``). The blocking interceptor answers from a :class:`~tokensvc_client.jwks.JwksCache`,
the asyncio one awaits an :class:`~tokensvc_client.jwks.AsyncJwksCache`; neither repeats a
rule. The decision covers everything the call's metadata tells: the token, revocation,
step-up requirements (:class:`StepUp`, RFC 9470) and the method policy. What needs the
call's TLS peer -- certificate binding (RFC 8705) -- is decided by
:meth:`Authenticator.check_binding` once the handler runs, where the peer is known. Also
here: what the two interceptors share about method handlers (their kind, and a handler of
the same kind with another behaviour).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import re
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import grpc

from tokensvc_client import _metrics
from tokensvc_client.errors import REASON_TRAILER, InvalidToken, Reason
from tokensvc_client.jwks import CURRENT, KeyRequest
from tokensvc_client.peer import peer_of
from tokensvc_client.verifier import Claims, KeySet, Verifier

log = logging.getLogger("tokensvc_client.auth")

#: gRPC health checking and server reflection (both versions) need no token.
DEFAULT_EXEMPT: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
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


Metadata = Sequence[tuple[str, str | bytes]] | None


#: Trailing metadata of a rejection: a tuple, so a :class:`Rejection` stays hashable.
Trailers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a call is refused: the status code, the whole message the caller sees and the
    trailing metadata sent with it (e.g. ``tokensvc-reason``, ``www-authenticate``)."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: Trailers = ()

    @classmethod
    def invalid_token(cls, reason: Reason) -> Rejection:
        """UNAUTHENTICATED with nothing but the stable reason code (SPEC.md section 10)."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {reason.value}")


#: No key set could be fetched yet: not the caller's fault, and worth a retry.
KEYS_UNAVAILABLE = Rejection(grpc.StatusCode.UNAVAILABLE, "token keys unavailable")
#: A hook (revocation check, method policy) raised: fail closed.
CHECK_FAILED = Rejection(grpc.StatusCode.UNAVAILABLE, "authorization check failed")

#: The token is bound to a certificate (``cnf``) other than the call's client certificate,
#: or the call has none.
CERTIFICATE_MISMATCH = Rejection.invalid_token(Reason.CERTIFICATE_MISMATCH)
#: ``require_binding`` and the token is not bound to a certificate.
UNBOUND = Rejection.invalid_token(Reason.UNBOUND)
#: The token lacks a role the method's :class:`StepUp` requires.
INSUFFICIENT_ROLE = Rejection(
    grpc.StatusCode.PERMISSION_DENIED,
    "insufficient role",
    ((REASON_TRAILER, Reason.INSUFFICIENT_ROLE.value),),
)

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


class Memo:
    """A bounded map (oldest entry dropped first: O(1), no lock; a racing thread at worst
    drops one entry more) for what is worth remembering per exact input."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        return self._entries.get(key)

    def put(self, key: Any, value: Any) -> None:
        if self.size <= 0:
            return
        if len(self._entries) >= self.size:
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                del self._entries[next(iter(self._entries))]
        self._entries[key] = value

    def __len__(self) -> int:
        return len(self._entries)


class HandlerMemo(Memo):
    """Handlers already wrapped for a verified token's claims: a warm call reuses the
    wrapper instead of building one (the same claims object comes back from the
    verifier's cache while the token stays valid)."""

    def wrapped(self, handler: Handler, claims: Claims, build: Callable[[], Handler]) -> Handler:
        key = (id(handler), id(claims))
        hit = self.get(key)
        if hit is not None and hit[0] is handler and hit[1] is claims:  # ids not reused
            return cast("Handler", hit[2])
        made = build()
        self.put(key, (handler, claims, made))  # holding both keeps their ids unique
        return made


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


# Printable ASCII but space, double quote and backslash: safe inside a quoted auth-param
# of www-authenticate, and separable by spaces in its acr_values.
_ACR_VALUE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


@dataclass(frozen=True, slots=True, init=False)
class StepUp:
    """What a token must show, beyond being valid, to call a method (RFC 9470 step-up).

    Args:
        roles: every one of these must be in the token's ``roles``.
        acr: if not empty, the token's ``acr`` must be one of these.
        max_auth_age: if set, the token's ``auth_time`` must be at most this many seconds
            before now (the verifier's clock, without leeway); a token without
            ``auth_time`` fails.

    A missing role is PERMISSION_DENIED ``insufficient role``; a failed ``acr`` or age
    requirement is PERMISSION_DENIED ``insufficient user authentication`` with a
    ``www-authenticate`` trailer (RFC 9470 section 3) naming the ``acr_values`` and
    ``max_age`` to satisfy. ``StepUp()`` requires nothing: as an exact entry it exempts
    one method from a prefix entry.

    Raises:
        TypeError: ``roles`` or ``acr`` given as one string instead of a collection.
        ValueError: an empty role, an ``acr`` value that cannot be sent in the
            ``www-authenticate`` header (only printable ASCII without spaces, quotes or
            backslashes), or a negative ``max_auth_age``.
    """

    roles: frozenset[str]
    acr: frozenset[str]
    max_auth_age: int | None

    def __init__(
        self,
        roles: Iterable[str] = frozenset(),
        acr: Iterable[str] = frozenset(),
        max_auth_age: int | None = None,
    ) -> None:
        if isinstance(roles, str) or isinstance(acr, str):
            raise TypeError("pass roles and acr as collections of strings, not one string")
        role_set, acr_set = frozenset(roles), frozenset(acr)
        if not all(isinstance(r, str) and r for r in role_set):
            raise ValueError("roles must be non-empty strings")
        if not all(isinstance(a, str) and _ACR_VALUE.fullmatch(a) for a in acr_set):
            raise ValueError("acr values must be printable ASCII without spaces or quotes")
        if max_auth_age is not None and (
            isinstance(max_auth_age, bool) or not isinstance(max_auth_age, int) or max_auth_age < 0
        ):
            raise ValueError("max_auth_age must be a non-negative number of seconds")
        object.__setattr__(self, "roles", role_set)
        object.__setattr__(self, "acr", acr_set)
        object.__setattr__(self, "max_auth_age", max_auth_age)


@functools.lru_cache(maxsize=256)
def insufficient_user_authentication(step_up: StepUp, description: str) -> Rejection:
    """PERMISSION_DENIED with the RFC 9470 challenge telling the caller how to step up."""
    challenge = (
        f'Bearer error="insufficient_user_authentication", error_description="{description}"'
    )
    if step_up.acr:
        challenge += f', acr_values="{" ".join(sorted(step_up.acr))}"'
    if step_up.max_auth_age is not None:
        challenge += f', max_age="{step_up.max_auth_age}"'
    return Rejection(
        grpc.StatusCode.PERMISSION_DENIED,
        "insufficient user authentication",
        (
            (REASON_TRAILER, Reason.INSUFFICIENT_USER_AUTHENTICATION.value),
            ("www-authenticate", challenge),
        ),
    )


_OTHER_ACR = "A different authentication level is required"
_RECENT_AUTH = "More recent authentication is required"


class StepUpTable:
    """Step-up requirements by full method name, or by prefix (an entry ending in "/", as
    in :class:`MethodFilter`). An exact entry wins over prefixes; of several prefixes the
    longest wins."""

    #: lookups remembered; gRPC only asks about registered methods, so few are ever seen
    _MEMO_MAX = 4096

    def __init__(self, entries: Mapping[str, StepUp]) -> None:
        for key in entries:
            method_key(key, "step_up key")
        if not all(isinstance(v, StepUp) for v in entries.values()):
            raise TypeError("step-up requirements must be StepUp instances")
        self._exact = {k: v for k, v in entries.items() if not k.endswith("/")}
        self._prefixes = sorted(
            ((k, v) for k, v in entries.items() if k.endswith("/")),
            key=lambda item: len(item[0]),
            reverse=True,
        )
        self._memo: dict[str, StepUp | None] = {}

    def __len__(self) -> int:
        return len(self._exact) + len(self._prefixes)

    def lookup(self, method: str) -> StepUp | None:
        """The requirement for ``method``, or ``None``."""
        try:
            return self._memo[method]
        except KeyError:
            pass
        found = self._exact.get(method)
        if found is None:
            found = next((v for k, v in self._prefixes if method.startswith(k)), None)
        if len(self._memo) < self._MEMO_MAX:
            self._memo[method] = found
        return found


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
        self._tokens = Memo(verifier.cache_size)

    def _token(self, metadata: Metadata) -> str:
        """:func:`bearer_token`, remembered per exact value of a lone header."""
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            return bearer_token(metadata)  # raises the right reason
        token: str | None = self._tokens.get(values[0])
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
        presented = peer_of(context).thumbprint
        # bytes: compare_digest refuses str with non-ASCII characters
        if not presented or not hmac.compare_digest(
            bound.encode("utf-8"), presented.encode("utf-8")
        ):
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


def reason_of(rejection: Rejection) -> str:
    """The stable reason code of a rejection (a metric attribute): ``invalid token: X``
    gives X, else its ``tokensvc-reason`` trailer, else its status code's name."""
    prefix = "invalid token: "
    if rejection.message.startswith(prefix):
        return rejection.message[len(prefix) :]
    trailers = dict(rejection.trailing_metadata)
    return trailers.get(REASON_TRAILER) or rejection.code.name.lower()


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
