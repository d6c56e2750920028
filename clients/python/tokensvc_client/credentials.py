"""Call credentials: attach the access token to outgoing calls and refresh it before expiry.

Usage::

    tokens = TokenClient("tokensvc:50051", ca="ca.pem")
    creds = token_call_credentials(pair, tokens.refresh, on_refresh=store_refresh_token)
    orders = grpc.secure_channel(
        "orders:443", grpc.composite_channel_credentials(grpc.ssl_channel_credentials(), creds)
    )

gRPC sends call credentials **only on secure channels**: TLS, or gRPC *local* credentials
(``grpc.local_channel_credentials()``), which connect only to loopback and Unix sockets --
use those for plaintext development servers; see :mod:`tokensvc_client.channels`. On
``grpc.insecure_channel`` the credentials are silently not sent.

Refresh rotates the refresh token, so keep the new pair (``on_refresh``) if the session
must survive a restart. With ``TokenClient.refresh`` as ``refresh``, a Refresh whose reply
is lost is sent once more when the server announces a grace window, never otherwise (see
:meth:`tokensvc_client.client.TokenClient.refresh`). The plugin runs on gRPC's threads
and refreshes with a blocking call, for blocking and asyncio channels alike.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from tokensvc_client.errors import (
    InvalidArgument,
    PermissionDenied,
    RpcFailed,
    TokenServiceError,
    Unauthenticated,
)
from tokensvc_client.results import TokenPair

log = logging.getLogger("tokensvc_client.credentials")

DEFAULT_REFRESH_MARGIN = 60.0
#: After a transient refresh failure, the still-valid token is used this long before the
#: next attempt, so an outage of tokensvc does not add a timeout to every call.
RETRY_AFTER_FAILURE = 1.0
#: Failures that no retry fixes: the session is gone; the subject must log in again.
_PERMANENT = (Unauthenticated, InvalidArgument, PermissionDenied)


class TokenCredentials(grpc.AuthMetadataPlugin):
    """Holds a session's :class:`~tokensvc_client.results.TokenPair` and adds
    ``authorization: Bearer <access token>`` to every call.

    Thread-safe: one refresh at a time; callers arriving meanwhile wait for it and use its
    result.

    Args:
        tokens: the pair from Issue (or a previous refresh).
        refresh: spends a refresh token for a new pair, normally ``TokenClient.refresh``.
        refresh_margin: refresh when the access token expires within this many seconds --
            but never earlier than half its lifetime, so short-lived tokens are not
            refreshed on every call.
        clock: current UNIX time; injectable for tests.
        on_refresh: called with each new pair (e.g. to persist the new refresh token), in
            order, while other callers wait: keep it quick.
    """

    def __init__(
        self,
        tokens: TokenPair,
        refresh: Callable[[str], TokenPair],
        *,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], float] = time.time,
        on_refresh: Callable[[TokenPair], None] | None = None,
    ) -> None:
        if refresh_margin < 0:
            raise ValueError("refresh_margin must not be negative")
        self._refresh = refresh
        self._margin = refresh_margin
        self._clock = clock
        self._on_refresh = on_refresh
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._failure: Exception | None = None
        self._set(tokens, clock())

    @property
    def tokens(self) -> TokenPair:
        """The current pair."""
        return self._pair

    def set_tokens(self, tokens: TokenPair) -> None:
        """Replace the pair, e.g. after a new login once a refresh failed for good."""
        with self._lock:
            self._failure = None
            self._retry_at = 0.0
            self._set(tokens, self._clock())

    def _set(self, tokens: TokenPair, now: float) -> None:
        lifetime = max(0.0, tokens.access_expires_at - now)
        self._refresh_at = tokens.access_expires_at - min(self._margin, lifetime / 2)
        self._pair = tokens

    def access_token(self) -> str:
        """The access token to send now, refreshed first when it is due.

        Raises:
            TokenServiceError: the refresh failed and the current token is expired, or the
                session can no longer be refreshed (``Unauthenticated`` etc.).
        """
        if self._clock() < self._refresh_at and self._failure is None:
            return self._pair.access_token
        with self._lock:
            now = self._clock()
            pair = self._pair
            if self._failure is not None:
                raise self._failure.with_traceback(None)  # no traceback pile-up
            if now < self._refresh_at or (now < self._retry_at and now < pair.access_expires_at):
                return pair.access_token  # refreshed meanwhile, or backing off
            try:
                new = self._refresh(pair.refresh_token)
            except Exception as err:
                return self._refresh_failed(err, pair, now)
            self._set(new, now)
            log.debug("access token refreshed sid=%s", new.session_id)
            if self._on_refresh is not None:
                # Under the lock, so the hook sees the pairs in order.
                try:
                    self._on_refresh(new)
                except Exception:
                    log.exception("on_refresh hook failed sid=%s", new.session_id)
            return new.access_token

    def _refresh_failed(self, err: Exception, pair: TokenPair, now: float) -> str:
        if isinstance(err, _PERMANENT):
            log.warning("session can no longer be refreshed sid=%s: %s", pair.session_id, err)
            self._failure = err
            raise err
        if now < pair.access_expires_at:
            log.warning(
                "refresh failed, still using the current token sid=%s: %s", pair.session_id, err
            )
            self._retry_at = now + RETRY_AFTER_FAILURE
            return pair.access_token
        raise err

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        """gRPC's plugin entry point: hand over the header, or the (token-free) error."""
        try:
            token = self.access_token()
        except Exception as err:
            callback((), _token_free(err))
            return
        callback((("authorization", f"Bearer {token}"),), None)

    def call_credentials(self) -> grpc.CallCredentials:
        """These credentials as ``grpc.CallCredentials``."""
        return grpc.metadata_call_credentials(self, name="tokensvc")


def _token_free(err: Exception) -> Exception:
    """An error for gRPC that surely holds no token: library errors carry the service's
    status and reason code only; anything else is reduced to its type name."""
    if isinstance(err, RpcFailed):
        return RpcFailed(f"token refresh failed: {err}", err.code)
    return TokenServiceError(f"token refresh failed: {type(err).__name__}")


def token_call_credentials(
    tokens: TokenPair,
    refresh: Callable[[str], TokenPair],
    *,
    refresh_margin: float = DEFAULT_REFRESH_MARGIN,
    clock: Callable[[], float] = time.time,
    on_refresh: Callable[[TokenPair], None] | None = None,
) -> grpc.CallCredentials:
    """``grpc.CallCredentials`` from a new :class:`TokenCredentials` (same arguments)."""
    return TokenCredentials(
        tokens, refresh, refresh_margin=refresh_margin, clock=clock, on_refresh=on_refresh
    ).call_credentials()
