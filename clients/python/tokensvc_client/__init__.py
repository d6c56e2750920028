"""Client library of tokensvc: stubs, TokenClient, AuthInterceptor, call credentials."""

from tokensvc_client._auth import DEFAULT_EXEMPT, MethodPolicy, RevocationCheck
from tokensvc_client._chains import ActorChain
from tokensvc_client._feed_core import FeedStale
from tokensvc_client._rejection import Rejection
from tokensvc_client._stepup import StepUp
from tokensvc_client.aio import AsyncTokenClient
from tokensvc_client.aio_interceptor import AioAuthInterceptor
from tokensvc_client.channels import aio_channel, channel, channel_credentials
from tokensvc_client.client import TokenClient
from tokensvc_client.context import (
    NoClaims,
    TransactionLogFilter,
    current_access_token,
    current_claims,
    current_claims_or_none,
    current_transaction,
    current_transaction_or_none,
    outgoing_txn_token,
    sending_txn_token,
)
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
from tokensvc_client.propagation import (
    AioTransactionPropagator,
    TransactionPropagator,
    aio_transaction_propagators,
)
from tokensvc_client.results import (
    ExchangedToken,
    Introspection,
    Jwks,
    SessionInfo,
    TokenPair,
    TransactionToken,
)
from tokensvc_client.revocation_feed import FEED_CHANNEL_OPTIONS, AioRevocationFeed, RevocationFeed
from tokensvc_client.revocations import RevocationSet
from tokensvc_client.verifier import (
    Claims,
    KeySet,
    TransactionClaims,
    TransactionVerifier,
    Verifier,
)

__all__ = [
    "DEFAULT_EXEMPT",
    "FEED_CHANNEL_OPTIONS",
    "ActorChain",
    "AioAuthInterceptor",
    "AioRevocationFeed",
    "AioTransactionPropagator",
    "AsyncJwksCache",
    "AsyncTokenClient",
    "AuthInterceptor",
    "Claims",
    "ExchangedToken",
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
    "TransactionClaims",
    "TransactionLogFilter",
    "TransactionPropagator",
    "TransactionToken",
    "TransactionVerifier",
    "Unauthenticated",
    "Unavailable",
    "Verifier",
    "aio_channel",
    "aio_transaction_propagators",
    "channel",
    "channel_credentials",
    "current_access_token",
    "current_claims",
    "current_claims_or_none",
    "current_transaction",
    "current_transaction_or_none",
    "from_rpc_error",
    "outgoing_txn_token",
    "sending_txn_token",
    "token_call_credentials",
]
