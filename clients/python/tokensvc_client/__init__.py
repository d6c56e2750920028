"""Client library of tokensvc: stubs, TokenClient, AuthInterceptor, call credentials."""

from tokensvc_client.errors import (
    InvalidArgument,
    InvalidToken,
    KeysUnavailable,
    PermissionDenied,
    RateLimited,
    Reason,
    RpcFailed,
    TokenServiceError,
    Unauthenticated,
    Unavailable,
)
from tokensvc_client.verifier import Claims, KeySet, Verifier

__all__ = [
    "Claims",
    "InvalidArgument",
    "InvalidToken",
    "KeySet",
    "KeysUnavailable",
    "PermissionDenied",
    "RateLimited",
    "Reason",
    "RpcFailed",
    "TokenServiceError",
    "Unauthenticated",
    "Unavailable",
    "Verifier",
]
