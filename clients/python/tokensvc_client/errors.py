"""Exceptions of the tokensvc client library.

One root (:class:`TokenServiceError`), two families below it:

* :class:`InvalidToken` -- a token failed verification. Its ``reason`` is a stable,
  machine-readable code (see :class:`Reason`); callers of a service only ever learn the
  code, never more detail.
* :class:`RpcFailed` and its subclasses -- a call to the token service failed; one subclass
  per gRPC status code the service answers with (SPEC.md section 10). :func:`from_rpc_error`
  is the one place where ``grpc.RpcError`` is converted.
"""

from __future__ import annotations

import enum

import grpc


class TokenServiceError(Exception):
    """Root of every exception raised by tokensvc_client."""


class Reason(enum.StrEnum):
    """Stable reason codes for a rejected token."""

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


class InvalidToken(TokenServiceError):
    """A token was rejected. ``reason`` says which rule rejected it."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class KeysUnavailable(TokenServiceError):
    """The JWK Set could not be fetched or parsed."""


class RpcFailed(TokenServiceError):
    """A call to the token service failed."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(RpcFailed):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(RpcFailed):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RpcFailed):
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(RpcFailed):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RpcFailed):
    """The service (or its Redis) is unreachable, or the deadline passed. Safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[RpcFailed]] = {
    cls.code: cls for cls in (InvalidArgument, Unauthenticated, PermissionDenied, RateLimited)
}
_BY_CODE[grpc.StatusCode.UNAVAILABLE] = Unavailable
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable


def from_rpc_error(err: grpc.RpcError) -> RpcFailed:
    """Convert a ``grpc.RpcError`` (sync or asyncio) into the library's exception."""
    # grpc.Call (sync) and grpc.aio.AioRpcError both have code()/details(); neither is the
    # other's subclass, so look the methods up instead of checking the type.
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else str(err)
    cls = _BY_CODE.get(code, RpcFailed)
    return cls(f"{code.name}: {details}", code)
