"""Client library of tokensvc: stubs, TokenClient, AuthInterceptor, call credentials."""

from tokensvc_client._auth import DEFAULT_EXEMPT, MethodPolicy, RevocationCheck
from tokensvc_client._feed_core import FeedStale
from tokensvc_client._rejection import Rejection
from tokensvc_client._stepup import StepUp
from tokensvc_client.aio import AsyncTokenClient
from tokensvc_client.aio_interceptor import AioAuthInterceptor
from tokensvc_client.channels import aio_channel, channel, channel_credentials
from tokensvc_client.client import TokenClient
from tokensvc_client.context import NoClaims, current_claims, current_claims_or_none
from tokensvc_client.credentials import TokenCredentials, token_call_credentials
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
    from_rpc_error,
)
from tokensvc_client.interceptor import AuthInterceptor
from tokensvc_client.jwks import AsyncJwksCache, JwksCache
from tokensvc_client.jwks_http import HttpsJwksSource
from tokensvc_client.results import Introspection, Jwks, SessionInfo, TokenPair
from tokensvc_client.revocation_feed import FEED_CHANNEL_OPTIONS, AioRevocationFeed, RevocationFeed
from tokensvc_client.revocations import RevocationSet
from tokensvc_client.verifier import Claims, KeySet, Verifier

__all__ = [
    "DEFAULT_EXEMPT",
    "FEED_CHANNEL_OPTIONS",
    "AioAuthInterceptor",
    "AioRevocationFeed",
    "AsyncJwksCache",
    "AsyncTokenClient",
    "AuthInterceptor",
    "Claims",
    "FeedStale",
    "HttpsJwksSource",
    "Introspection",
    "InvalidArgument",
    "InvalidToken",
    "Jwks",
    "JwksCache",
    "KeySet",
    "KeysUnavailable",
    "MethodPolicy",
    "NoClaims",
    "PermissionDenied",
    "RateLimited",
    "Reason",
    "Rejection",
    "RevocationCheck",
    "RevocationFeed",
    "RevocationSet",
    "RpcFailed",
    "SessionInfo",
    "StepUp",
    "TokenClient",
    "TokenCredentials",
    "TokenPair",
    "TokenServiceError",
    "Unauthenticated",
    "Unavailable",
    "Verifier",
    "aio_channel",
    "channel",
    "channel_credentials",
    "current_claims",
    "current_claims_or_none",
    "from_rpc_error",
    "token_call_credentials",
]
