"""Exceptions of the tokensvc client library.

One root (:class:`TokenServiceError`), two families below it:

* :class:`InvalidToken` -- a token failed verification. Its ``reason`` is a stable,
  machine-readable code (see :class:`Reason`); callers of a service only ever learn the
  code, never more detail.
* :class:`RpcFailed` and its subclasses -- a call to the token service failed; one subclass
  per gRPC status code the service answers with (docs/design.md, Errors). :func:`from_rpc_error`
  is the one place where ``grpc.RpcError`` is converted. It works for errors of any
  service behind the auth interceptors as well: its ``reason`` says why a call was denied
  (e.g. ``insufficient_user_authentication``: authenticate again, then retry).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import grpc

#: Trailing metadata key naming the :class:`Reason` of a denial (step-up requirements).
REASON_TRAILER = "tokensvc-reason"


class TokenServiceError(Exception):
    """Root of every exception raised by tokensvc_client."""


class Reason(enum.StrEnum):
    """Stable reason codes for a rejected token.

    All but the last three reject the token (UNAUTHENTICATED ``invalid token: <code>``, or
    ``invalid txn-token: <code>`` for the Transaction Token); the last three deny a valid
    token a method's requirements (PERMISSION_DENIED, code in the ``tokensvc-reason``
    trailer).
    """

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    REFRESH_AS_ACCESS = "refresh_token_as_access_token"
    BAD_HEADER = "bad_header"
    BAD_ALGORITHM = "bad_algorithm"
    BAD_TYPE = "bad_type"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    BAD_CLAIMS = "bad_claims"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    REVOKED = "revoked"
    MISSING = "missing_token"
    #: bound (RFC 8705 ``cnf``) to another certificate than the call's client certificate
    CERTIFICATE_MISMATCH = "certificate_mismatch"
    #: not bound to a certificate where the interceptor requires binding
    UNBOUND = "unbound"
    #: lacks a role the method requires
    INSUFFICIENT_ROLE = "insufficient_role"
    #: the user must authenticate again: another ``acr`` or a more recent ``auth_time``
    #: (RFC 9470); the ``www-authenticate`` trailer says which
    INSUFFICIENT_USER_AUTHENTICATION = "insufficient_user_authentication"
    #: the token's actor chain (RFC 8693 ``act``) is not one the method accepts
    ACTOR_CHAIN = "actor_chain"


class InvalidToken(TokenServiceError):
    """A token was rejected. ``reason`` says which rule rejected it."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class KeysUnavailable(TokenServiceError):
    """The JWK Set could not be fetched or parsed."""


class RpcFailed(TokenServiceError):
    """A call to the token service (or a service behind the auth interceptors) failed.

    Attributes:
        code: the gRPC status code.
        reason: the ``tokensvc-reason`` trailer (a :class:`Reason` value, e.g.
            ``insufficient_role``), ``""`` if the call had none.
        trailing_metadata: all trailing metadata of the failed call, e.g. the
            ``www-authenticate`` challenge of a step-up denial.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        *,
        reason: str = "",
        trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.reason = reason
        self.trailing_metadata = tuple(trailing_metadata)

    def trailer(self, key: str) -> str:
        """The first text value of trailing metadata ``key`` (any case), ``""`` if absent."""
        key = key.lower()
        for name, value in self.trailing_metadata:
            if name.lower() == key and isinstance(value, str):
                return value
        return ""


class InvalidArgument(RpcFailed):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RpcFailed):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RpcFailed):
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(RpcFailed):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RpcFailed):
    """The service (or its Redis) is unreachable, or the deadline passed, or the call was
    CANCELLED by the server or connection (a server stopping: tokensvc itself drains
    without cancelling, but a proxy or an older replica may not). Safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[RpcFailed]] = {
    cls.code: cls for cls in (InvalidArgument, Unauthenticated, PermissionDenied, RateLimited)
}
_BY_CODE[grpc.StatusCode.UNAVAILABLE] = Unavailable
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable
# a caller that cancels its own call gets no RpcError to convert (asyncio raises
# CancelledError, a cancelled future never reports one): CANCELLED came from the far side
_BY_CODE[grpc.StatusCode.CANCELLED] = Unavailable


def from_rpc_error(err: grpc.RpcError) -> RpcFailed:
    """Convert a ``grpc.RpcError`` (sync or asyncio) into the library's exception."""
    # grpc.Call (sync) and grpc.aio.AioRpcError both have code()/details(); neither is the
    # other's subclass, so look the methods up instead of checking the type.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    trailers_fn = getattr(err, "trailing_metadata", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(err)
    trailers = tuple((k, v) for k, v in (trailers_fn() if callable(trailers_fn) else None) or ())
    cls = _BY_CODE.get(code, RpcFailed)
    failed = cls(f"{code.name}: {details}", code, trailing_metadata=trailers)
    failed.reason = failed.trailer(REASON_TRAILER)
    return failed
