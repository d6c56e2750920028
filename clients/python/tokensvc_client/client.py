"""Blocking client of tokensvc.

Every call has a deadline and raises the library's exceptions
(:mod:`tokensvc_client.errors`), never ``grpc.RpcError``. Requests and results are built by
:mod:`tokensvc_client._calls`, shared with the asyncio client in :mod:`tokensvc_client.aio`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc

from tokensvc_client import _calls
from tokensvc_client._refresh_retry import GraceWindow, trailing
from tokensvc_client.channels import Pem, channel
from tokensvc_client.errors import from_rpc_error
from tokensvc_client.results import (
    ExchangedToken,
    Introspection,
    Jwks,
    SessionInfo,
    TokenPair,
    TransactionToken,
)
from tokensvc_client.v1 import tokensvc_pb2_grpc

Result = TypeVar("Result")
log = logging.getLogger("tokensvc_client.client")


class TokenClient:
    """Calls TokenService over a blocking gRPC channel.

    Args:
        channel_or_target: an existing channel (the caller keeps owning it), or a
            "host:port" target for which the client opens -- and :meth:`close` closes -- a
            channel with :func:`~tokensvc_client.channels.channel`.
        timeout: deadline of every call, seconds.
        ca, cert, key, insecure: TLS settings for a target (see
            :func:`~tokensvc_client.channels.channel`); not allowed with a channel.

    Raises:
        ValueError: TLS settings passed together with a channel, or a bad timeout.

    Every method raises :class:`~tokensvc_client.errors.RpcFailed` (or the subclass for the
    status code) when the call fails, e.g. ``InvalidArgument``, ``Unauthenticated``,
    ``Unavailable`` (also on a missed deadline).
    """

    def __init__(
        self,
        channel_or_target: grpc.Channel | str,
        *,
        timeout: float = 5.0,
        ca: Pem | None = None,
        cert: Pem | None = None,
        key: Pem | None = None,
        insecure: bool = False,
    ) -> None:
        self._timeout = _calls.check_timeout(timeout)
        if isinstance(channel_or_target, str):
            self._channel = channel(channel_or_target, ca=ca, cert=cert, key=key, insecure=insecure)
            self._owns_channel = True
        else:
            if ca is not None or cert is not None or key is not None or insecure:
                raise ValueError("TLS settings only apply to a target, not to a channel")
            self._channel = channel_or_target
            self._owns_channel = False
        self._stub = tokensvc_pb2_grpc.TokenServiceStub(self._channel)
        self._grace = GraceWindow()

    def _invoke(self, call: _calls.Call[Any, Result]) -> Result:
        try:
            return self._send(call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _send(self, call: _calls.Call[Any, Result]) -> Result:
        """One attempt; raises grpc.RpcError. Learns the server's grace window."""
        method = getattr(self._stub, call.method)
        try:
            response, rpc = method.with_call(
                call.request, timeout=self._timeout, metadata=call.metadata or None
            )
        except grpc.RpcError as err:
            self._grace.learn(trailing(err))
            raise
        self._grace.learn(rpc.trailing_metadata(), answered=True)
        return call.parse(response)

    def issue(
        self,
        subject: str,
        *,
        roles: Iterable[str] = (),
        audience: Iterable[str] = (),
        client_id: str = "",
        acr: str = "",
        amr: Iterable[str] = (),
        auth_time: float | datetime | None = None,
        session_label: str = "",
        bind_to_client_certificate: bool = False,
        cnf_x5t_s256: str = "",
    ) -> TokenPair:
        """Start a session for an authenticated ``subject``.

        ``audience`` empty means the service's default; ``auth_time`` is epoch seconds or
        an aware datetime of the user's authentication.

        Certificate-bound tokens (RFC 8705), at most one of:
        ``bind_to_client_certificate`` binds the session's tokens to the TLS client
        certificate of this call (a workload fetching its own tokens over mTLS);
        ``cnf_x5t_s256`` to the certificate with that thumbprint (see
        :func:`~tokensvc_client.peer.certificate_thumbprint`), for a login service issuing
        on behalf of another workload. An interceptor then accepts the access tokens only
        over a connection authenticated with that certificate.
        """
        return self._invoke(
            _calls.issue(
                subject,
                roles=roles,
                audience=audience,
                client_id=client_id,
                acr=acr,
                amr=amr,
                auth_time=auth_time,
                session_label=session_label,
                bind_to_client_certificate=bind_to_client_certificate,
                cnf_x5t_s256=cnf_x5t_s256,
            )
        )

    def refresh(self, refresh_token: str) -> TokenPair:
        """Spend ``refresh_token`` for a new pair; keep the new refresh token.

        If the answer is lost (``Unavailable``, also on a missed deadline) and the server
        announces a grace window (``--refresh-grace-seconds``), the call is sent once more
        while the window lasts: the server answers it with the same successor, so the
        session survives. A strict server's Refresh is never re-sent (see
        :mod:`tokensvc_client._refresh_retry`).

        Raises:
            Unauthenticated: the token is invalid, expired, revoked or was already used
                (a reuse revokes the whole session).
        """
        call = _calls.refresh(refresh_token)
        started = time.monotonic()
        try:
            return self._send(call)
        except grpc.RpcError as err:
            if self._grace.worth_asking(err):
                with contextlib.suppress(grpc.RpcError):
                    self._send(_calls.get_keys())
            if not self._grace.allows_retry(err, time.monotonic() - started):
                raise from_rpc_error(err) from err
            log.info("refresh answer lost (%s); retrying within the grace window", err.code())
        return self._invoke(call)

    def revoke(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        subject: str | None = None,
        reason: str = "",
    ) -> int:
        """Revoke one token, one session or every session of a subject.

        Returns:
            The number of sessions revoked (0 for an access token).

        Raises:
            ValueError: not exactly one target given.
        """
        return self._invoke(
            _calls.revoke(token=token, session_id=session_id, subject=subject, reason=reason)
        )

    def lock_subject(self, subject: str, reason: str = "") -> int:
        """Revoke every session of ``subject`` and refuse to issue to it until
        :meth:`unlock_subject` (a compromised account).

        Returns:
            The number of sessions revoked.
        """
        return self._invoke(_calls.lock_subject(subject, reason))

    def unlock_subject(self, subject: str) -> bool:
        """Let the service issue to ``subject`` again; revoked sessions stay revoked.

        Returns:
            Whether the subject was locked.
        """
        return self._invoke(_calls.unlock_subject(subject))

    def introspect(self, token: str) -> Introspection:
        """Ask the service whether ``token`` (access or refresh) is active."""
        return self._invoke(_calls.introspect(token))

    def exchange(
        self,
        subject_token: str,
        audience: Iterable[str],
        *,
        roles: Iterable[str] = (),
        impersonate: bool = False,
    ) -> ExchangedToken:
        """Exchange an access token this workload received (e.g.
        :func:`~tokensvc_client.context.current_access_token`) for one to call
        ``audience`` (RFC 8693; docs/call-chains.md). The result carries ``roles`` (a
        subset; empty: all the policy lets pass), expires no later, keeps the session, is
        bound to this workload's certificate when it presents one, and names this workload
        in its ``act`` claim unless ``impersonate`` (only where the policy allows).
        """
        return self._invoke(
            _calls.exchange(subject_token, audience, roles=roles, impersonate=impersonate)
        )

    def mint_transaction_token(
        self,
        subject_token: str | None,
        scope: Iterable[str],
        *,
        replace: bool = False,
        request_details: dict[str, object] | None = None,
        request_context: dict[str, object] | None = None,
        lifetime_seconds: int = 0,
    ) -> TransactionToken:
        """A Transaction Token (draft-ietf-oauth-transaction-tokens-10; docs/call-chains.md)
        for ``scope``: at the edge from a user's access token ``subject_token``; with
        ``replace``, a narrower replacement of the Transaction Token ``subject_token``
        (e.g. :func:`~tokensvc_client.context.outgoing_txn_token`); with ``subject_token``
        ``None``, for this workload acting on its own. ``request_details`` becomes the
        immutable ``tctx``, ``request_context`` the ``rctx`` (e.g. ``{"req_ip": ...}``).
        """
        return self._invoke(
            _calls.mint_transaction_token(
                subject_token,
                scope,
                replace=replace,
                request_details=request_details,
                request_context=request_context,
                lifetime_seconds=lifetime_seconds,
            )
        )

    def get_keys(self) -> Jwks:
        """Fetch the public keys that verify access tokens."""
        return self._invoke(_calls.get_keys())

    def list_sessions(self, subject: str, *, access_token: str | None = None) -> list[SessionInfo]:
        """The sessions of ``subject`` (a "your devices" page).

        Args:
            access_token: the subject's own valid access token, for a caller that is not an
                admin identity of the service's policy (self-service listing); its ``aud``
                must name tokensvc itself (the service's ``--self-audience``, default
                ``tokensvc``).

        Raises:
            PermissionDenied: neither an admin identity nor the subject's own token.
            Unauthenticated: ``access_token`` is invalid, expired or revoked.
        """
        return self._invoke(_calls.list_sessions(subject, access_token=access_token))

    def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
