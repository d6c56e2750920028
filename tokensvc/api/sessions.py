"""Session RPCs of the token service: ListSessions and the WatchRevocations feed.

An RPC group of :class:`tokensvc.api.servicer.TokenService`. ListSessions serves the admin
identities of the caller policy, or the subject itself when the call carries that
subject's own valid access token (``authorization: Bearer ...``) whose ``aud`` names
tokensvc itself (``--self-audience``): a session-management page can show a user their
devices without an admin credential, and a service a user sent a token to cannot replay
it here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from tokensvc.api import validation
from tokensvc.api.admission import Guard, current_caller
from tokensvc.api.minting import Verification
from tokensvc.api.ports import Clock, SessionReads
from tokensvc.api.revocation_hub import RevocationHub
from tokensvc.api.times import ts as _ts
from tokensvc.errors import AuthFailure, Denial, Denied, NotAuthenticated
from tokensvc.families import tokens
from tokensvc_client.errors import InvalidToken
from tokensvc_client.peer import holds_bound_certificate
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.wire import bearer_token

ListCtx = grpc.aio.ServicerContext[pb.ListSessionsRequest, pb.ListSessionsResponse]
WatchCtx = grpc.aio.ServicerContext[pb.WatchRevocationsRequest, pb.RevocationEvent]


class SessionRpcs:
    """ListSessions and WatchRevocations."""

    def __init__(
        self,
        store: SessionReads,
        guard: Guard,
        hub: RevocationHub,
        verification: Verification,
        subject_tags: tokens.SubjectTags,
        *,
        clock: Clock,
    ) -> None:
        self.store = store
        self.guard = guard
        self.hub = hub
        self.verification = verification
        self.subject_tags = subject_tags
        self.clock = clock

    async def list_sessions(
        self, request: pb.ListSessionsRequest, context: ListCtx
    ) -> pb.ListSessionsResponse:
        subject = validation.text("subject", request.subject, required=True)
        if self.guard.enforce and not self.guard.policy.admits(
            "ListSessions", current_caller().peer
        ):
            await self._require_own_token(subject, context)
        now_ms = int(self.clock() * 1000)
        tags = (self.subject_tags.of(subject), tokens.SubjectTags.legacy(subject))
        families = await self.store.list_sessions(tags, now_ms)
        return pb.ListSessionsResponse(
            sessions=[
                pb.Session(
                    session_id=f.session_id,
                    client_id=f.client_id,
                    session_label=f.label,
                    created_at=_ts(f.created_ms / 1000),
                    last_refreshed_at=_ts(f.last_ms / 1000),
                    expires_at=_ts(f.expires_ms / 1000),
                    active=f.active,
                )
                for f in families
            ]
        )

    async def _require_own_token(self, subject: str, context: ListCtx) -> None:
        """The call must carry a valid, unrevoked access token of ``subject``."""
        # maybe relayed: counted against the peer in bulk, and against a subject only
        # once the token's signature proves whose it is (naming a subject proves nothing:
        # anyone could otherwise lock a user out of their own devices page)
        self.guard.presenting("")
        try:
            token = bearer_token(tuple(context.invocation_metadata() or ()))
        except InvalidToken:
            raise Denied(
                Denial.NO_CREDENTIAL, "ListSessions needs an admin identity or the subject's token"
            ) from None
        try:  # a token for tokensvc itself: not one a user sent another service
            claims = await self.verification.verify_own(token)
        except InvalidToken as err:
            raise NotAuthenticated(AuthFailure(err.reason.value)) from None
        self.guard.presenting(f"subject:{self.subject_tags.of(claims.subject)}")
        state = await self.store.access_state(
            claims.session_id, claims.token_id, int(self.clock() * 1000)
        )
        if not state.active:
            raise NotAuthenticated(AuthFailure.REVOKED)
        bound = claims.cnf_x5t_s256
        presented = current_caller().peer.thumbprint
        if bound and not holds_bound_certificate(bound, presented):
            self.guard.mismatched()  # the subject as this peer presents it (as Refresh)
            raise NotAuthenticated(
                AuthFailure.CERTIFICATE_MISMATCH
            )  # RFC 8705: a stolen bound token
        if claims.subject != subject:
            raise Denied(Denial.OTHER_SUBJECT, "a subject may only list its own sessions")

    async def watch_revocations(
        self, request: pb.WatchRevocationsRequest, context: WatchCtx
    ) -> AsyncIterator[pb.RevocationEvent]:
        resume_from = validation.text(
            "resume_from", request.resume_from, limit=validation.MAX_SHORT
        )
        # one client: one identity wherever it connects from (its addresses are its own to
        # pick), or one network for anonymous callers (127.0.0.0/8, an IPv6 /64)
        client = current_caller().key
        # a refusal (cap, full catch-ups, reader down) comes before the headers
        self.hub.check(client, resume_from)
        await context.send_initial_metadata(())  # the watcher knows it is connected at once
        async for event in self.hub.watch(resume_from, client):
            yield event
