"""The gRPC servicer: a façade that admits each call and hands it to its RPC group.

The groups (:class:`~tokensvc.api.token_rpcs.TokenRpcs`,
:class:`~tokensvc.api.refresh.RefreshRpcs`, :class:`~tokensvc.api.sessions.SessionRpcs`,
:class:`~tokensvc.api.admin.AdminRpcs`, :class:`~tokensvc.api.exchange.CallChainRpcs`) each
receive the narrow collaborators they use (:mod:`tokensvc.api.ports`); this module builds
them once and delegates. Every RPC is admitted first by the
:class:`~tokensvc.api.admission.Guard` (caller policy, rate limits; see
:func:`tokensvc.api.status.rpc`), and what it does is audited.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from tokensvc.api.admin import AdminRpcs
from tokensvc.api.admission import Guard
from tokensvc.api.exchange import CallChainRpcs
from tokensvc.api.minting import Minter, Verification
from tokensvc.api.ports import Clock
from tokensvc.api.refresh import RefreshRpcs
from tokensvc.api.revocation_hub import RevocationHub
from tokensvc.api.sessions import SessionRpcs
from tokensvc.api.status import rpc, stream_rpc
from tokensvc.api.token_rpcs import TokenRpcs
from tokensvc.config import Settings
from tokensvc.errors import Denied, NotAuthenticated
from tokensvc.families import tokens
from tokensvc.keys.ring import KeyRing
from tokensvc.keys.rotation import Lifecycle
from tokensvc.observe.audit import AuditTrail
from tokensvc.security.policy import CallerPolicy
from tokensvc.store import FamilyStore
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

_C = grpc.aio.ServicerContext


class TokenService(pb_grpc.TokenServiceServicer):
    """Implements tokensvc.v1.TokenService on a key ring and a family store."""

    def __init__(
        self,
        settings: Settings,
        store: FamilyStore,
        keyring: KeyRing,
        audit: AuditTrail,
        policy: CallerPolicy | None = None,
        hub: RevocationHub | None = None,
        *,
        clock: Clock = time.time,
    ) -> None:
        hub = hub or RevocationHub(store.redis, max_per_client=settings.max_watchers_per_client)
        policy = policy or CallerPolicy.default()
        self.guard = Guard(settings, store, audit, policy)
        minter = Minter(settings, keyring)
        verification = Verification(settings, keyring, clock)
        refresh_tokens = tokens.RefreshTokens(keyring.secret("refresh-mac"))
        subject_tags = tokens.SubjectTags(keyring.secret("subject-tag"))
        self.tokens = TokenRpcs(
            settings, store, keyring, audit, minter, verification, refresh_tokens, subject_tags,
            clock=clock,
        )  # fmt: skip
        self.refreshing = RefreshRpcs(
            store, self.guard, audit, minter, refresh_tokens,
            idle_ttl_s=settings.refresh_idle_ttl,
            grace_ms=settings.refresh_grace_seconds * 1000,
            clock=clock,
        )  # fmt: skip
        self.sessions = SessionRpcs(store, self.guard, hub, verification, subject_tags, clock=clock)
        self.call_chains = CallChainRpcs(
            settings, store, audit, minter, verification, policy, clock=clock
        )
        self.admin = AdminRpcs(
            store, keyring, audit, Lifecycle.from_settings(settings), subject_tags,
            subject_ttl_ms=self.tokens.subject_ttl_ms,
            clock=clock,
        )  # fmt: skip

    # -- admission (see tokensvc.api.status.Guarded) -------------------------------------

    async def admit(self, rpc: str, context: _C[Any, Any]) -> None:
        await self.guard.admit(rpc, context)

    async def rejected(self, rpc: str, err: NotAuthenticated | Denied) -> None:
        await self.guard.rejected(rpc, err)

    # -- TokenRpcs -----------------------------------------------------------------------

    @rpc
    async def Issue(
        self, request: pb.IssueRequest, context: _C[pb.IssueRequest, pb.IssueResponse]
    ) -> pb.IssueResponse:
        return await self.tokens.issue(request, context)

    @rpc
    async def Revoke(
        self, request: pb.RevokeRequest, context: _C[pb.RevokeRequest, pb.RevokeResponse]
    ) -> pb.RevokeResponse:
        return await self.tokens.revoke(request)

    @rpc
    async def Introspect(
        self,
        request: pb.IntrospectRequest,
        context: _C[pb.IntrospectRequest, pb.IntrospectResponse],
    ) -> pb.IntrospectResponse:
        return await self.tokens.introspect(request)

    @rpc
    async def GetKeys(
        self, request: pb.GetKeysRequest, context: _C[pb.GetKeysRequest, pb.GetKeysResponse]
    ) -> pb.GetKeysResponse:
        return await self.tokens.get_keys(request, context)

    # -- RefreshRpcs ---------------------------------------------------------------------

    @rpc
    async def Refresh(
        self, request: pb.RefreshRequest, context: _C[pb.RefreshRequest, pb.RefreshResponse]
    ) -> pb.RefreshResponse:
        return await self.refreshing.refresh(request, context)

    # -- SessionRpcs ---------------------------------------------------------------------

    @rpc
    async def ListSessions(
        self,
        request: pb.ListSessionsRequest,
        context: _C[pb.ListSessionsRequest, pb.ListSessionsResponse],
    ) -> pb.ListSessionsResponse:
        return await self.sessions.list_sessions(request, context)

    @stream_rpc
    async def WatchRevocations(
        self,
        request: pb.WatchRevocationsRequest,
        context: _C[pb.WatchRevocationsRequest, pb.RevocationEvent],
    ) -> AsyncIterator[pb.RevocationEvent]:
        async for event in self.sessions.watch_revocations(request, context):
            yield event

    # -- CallChainRpcs ------------------------------------------------------------------

    @rpc
    async def Exchange(
        self, request: pb.ExchangeRequest, context: _C[pb.ExchangeRequest, pb.ExchangeResponse]
    ) -> pb.ExchangeResponse:
        return await self.call_chains.exchange(request)

    @rpc
    async def MintTransactionToken(
        self,
        request: pb.MintTransactionTokenRequest,
        context: _C[pb.MintTransactionTokenRequest, pb.MintTransactionTokenResponse],
    ) -> pb.MintTransactionTokenResponse:
        return await self.call_chains.mint_transaction_token(request)

    # -- AdminRpcs -----------------------------------------------------------------------

    @rpc
    async def LockSubject(
        self,
        request: pb.LockSubjectRequest,
        context: _C[pb.LockSubjectRequest, pb.LockSubjectResponse],
    ) -> pb.LockSubjectResponse:
        return await self.admin.lock_subject(request)

    @rpc
    async def UnlockSubject(
        self,
        request: pb.UnlockSubjectRequest,
        context: _C[pb.UnlockSubjectRequest, pb.UnlockSubjectResponse],
    ) -> pb.UnlockSubjectResponse:
        return await self.admin.unlock_subject(request)

    @rpc
    async def ListKeys(
        self, request: pb.ListKeysRequest, context: _C[pb.ListKeysRequest, pb.ListKeysResponse]
    ) -> pb.ListKeysResponse:
        return await self.admin.list_keys(request)

    @rpc
    async def RotateKeys(
        self,
        request: pb.RotateKeysRequest,
        context: _C[pb.RotateKeysRequest, pb.RotateKeysResponse],
    ) -> pb.RotateKeysResponse:
        return await self.admin.rotate_keys(request)

    @rpc
    async def RetireKey(
        self, request: pb.RetireKeyRequest, context: _C[pb.RetireKeyRequest, pb.RetireKeyResponse]
    ) -> pb.RetireKeyResponse:
        return await self.admin.retire_key(request)
