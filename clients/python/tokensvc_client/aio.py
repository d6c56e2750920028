"""Asyncio client of tokensvc: :class:`AsyncTokenClient`.

The twin of :class:`~tokensvc_client.client.TokenClient`: same methods, same arguments, same
results and exceptions, built by the same :mod:`tokensvc_client._calls`; only the invocation
is awaited. Method documentation lives on the blocking client.
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
import grpc.aio

from tokensvc_client import _calls
from tokensvc_client._refresh_retry import GraceWindow, trailing
from tokensvc_client.channels import Pem, aio_channel
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
log = logging.getLogger("tokensvc_client.aio")


class AsyncTokenClient:
    """Calls TokenService over a ``grpc.aio`` channel.

    Args:
        channel_or_target: an existing ``grpc.aio.Channel`` (the caller keeps owning it)
            or a "host:port" target opened with
            :func:`~tokensvc_client.channels.aio_channel` and closed by :meth:`close`.
        timeout: deadline of every call, seconds.
        ca, cert, key, insecure: TLS settings for a target; not allowed with a channel.

    Raises:
        ValueError: TLS settings passed together with a channel, or a bad timeout.
    """

    def __init__(
        self,
        channel_or_target: grpc.aio.Channel | str,
        *,
        timeout: float = 5.0,
        ca: Pem | None = None,
        cert: Pem | None = None,
        key: Pem | None = None,
        insecure: bool = False,
    ) -> None:
        self._timeout = _calls.check_timeout(timeout)
        if isinstance(channel_or_target, str):
            self._channel = aio_channel(
                channel_or_target, ca=ca, cert=cert, key=key, insecure=insecure
            )
            self._owns_channel = True
        else:
            if ca is not None or cert is not None or key is not None or insecure:
                raise ValueError("TLS settings only apply to a target, not to a channel")
            self._channel = channel_or_target
            self._owns_channel = False
        self._stub = tokensvc_pb2_grpc.TokenServiceStub(self._channel)
        self._grace = GraceWindow()

    async def _invoke(self, call: _calls.Call[Any, Result]) -> Result:
        try:
            return await self._send(call)
        except grpc.RpcError as err:  # grpc.aio.AioRpcError is a grpc.RpcError
            raise from_rpc_error(err) from err

    async def _send(self, call: _calls.Call[Any, Result]) -> Result:
        """One attempt; raises grpc.RpcError. Learns the server's grace window."""
        rpc = getattr(self._stub, call.method)(
            call.request, timeout=self._timeout, metadata=call.metadata or None
        )
        try:
            response = await rpc
        except grpc.RpcError as err:
            self._grace.learn(trailing(err))
            raise
        self._grace.learn(await rpc.trailing_metadata(), answered=True)
        return call.parse(response)

    async def issue(
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
        """See :meth:`TokenClient.issue <tokensvc_client.client.TokenClient.issue>`."""
        return await self._invoke(
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

    async def refresh(self, refresh_token: str) -> TokenPair:
        """See :meth:`TokenClient.refresh <tokensvc_client.client.TokenClient.refresh>`
        (the same single retry within an announced grace window)."""
        call = _calls.refresh(refresh_token)
        started = time.monotonic()
        try:
            return await self._send(call)
        except grpc.RpcError as err:
            if self._grace.worth_asking(err):
                with contextlib.suppress(grpc.RpcError):
                    await self._send(_calls.get_keys())
            if not self._grace.allows_retry(err, time.monotonic() - started):
                raise from_rpc_error(err) from err
            log.info("refresh answer lost (%s); retrying within the grace window", err.code())
        return await self._invoke(call)

    async def revoke(
        self,
        *,
        token: str | None = None,
        session_id: str | None = None,
        subject: str | None = None,
        reason: str = "",
    ) -> int:
        """See :meth:`TokenClient.revoke <tokensvc_client.client.TokenClient.revoke>`."""
        return await self._invoke(
            _calls.revoke(token=token, session_id=session_id, subject=subject, reason=reason)
        )

    async def lock_subject(self, subject: str, reason: str = "") -> int:
        """See :meth:`TokenClient.lock_subject
        <tokensvc_client.client.TokenClient.lock_subject>`."""
        return await self._invoke(_calls.lock_subject(subject, reason))

    async def unlock_subject(self, subject: str) -> bool:
        """See :meth:`TokenClient.unlock_subject
        <tokensvc_client.client.TokenClient.unlock_subject>`."""
        return await self._invoke(_calls.unlock_subject(subject))

    async def introspect(self, token: str) -> Introspection:
        """See :meth:`TokenClient.introspect <tokensvc_client.client.TokenClient.introspect>`."""
        return await self._invoke(_calls.introspect(token))

    async def exchange(
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
        return await self._invoke(
            _calls.exchange(subject_token, audience, roles=roles, impersonate=impersonate)
        )

    async def mint_transaction_token(
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
        return await self._invoke(
            _calls.mint_transaction_token(
                subject_token,
                scope,
                replace=replace,
                request_details=request_details,
                request_context=request_context,
                lifetime_seconds=lifetime_seconds,
            )
        )

    async def get_keys(self) -> Jwks:
        """See :meth:`TokenClient.get_keys <tokensvc_client.client.TokenClient.get_keys>`."""
        return await self._invoke(_calls.get_keys())

    async def list_sessions(
        self, subject: str, *, access_token: str | None = None
    ) -> list[SessionInfo]:
        """See :meth:`TokenClient.list_sessions
        <tokensvc_client.client.TokenClient.list_sessions>`."""
        return await self._invoke(_calls.list_sessions(subject, access_token=access_token))

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self._channel.close(None)

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
