"""The Refresh RPC: rotation of a refresh family, its grace-window replays and reuse.

An RPC group of :class:`tokensvc.api.servicer.TokenService`. The token formats are
:mod:`tokensvc.families.tokens`' (generation, family end and MAC); the rotation is one script of
the family store (:meth:`tokensvc.store.FamilyStore.rotate`), whose module documents why
the family's state stays constant-size and reuse detection exact.
"""

from __future__ import annotations

import logging

import grpc.aio

from tokensvc.api import validation
from tokensvc.api.admission import Guard, current_caller
from tokensvc.api.minting import Minter
from tokensvc.api.ports import Clock, Rotations
from tokensvc.errors import AuthFailure, NotAuthenticated
from tokensvc.families import tokens
from tokensvc.observe.audit import AuditTrail
from tokensvc.store import Presented, RefreshStatus, Rotation, Successor
from tokensvc_client.v1 import tokensvc_pb2 as pb

log = logging.getLogger("tokensvc.service")
Ctx = grpc.aio.ServicerContext[pb.RefreshRequest, pb.RefreshResponse]


class RefreshRpcs:
    """Refresh (strict, or idempotent within ``--refresh-grace-seconds``)."""

    def __init__(
        self,
        store: Rotations,
        guard: Guard,
        audit: AuditTrail,
        minter: Minter,
        refresh_tokens: tokens.RefreshTokens,
        *,
        idle_ttl_s: int,
        grace_ms: int,
        clock: Clock,
    ) -> None:
        self.store = store
        self.guard = guard
        self.audit = audit
        self.minter = minter
        self.refresh_tokens = refresh_tokens
        self.idle_ttl_ms = idle_ttl_s * 1000
        self.grace_ms = grace_ms
        self.clock = clock

    async def refresh(self, request: pb.RefreshRequest, context: Ctx) -> pb.RefreshResponse:
        self.minter.announce_grace(context)  # also on errors: clients learn it
        presented = self.refresh_tokens.parse(
            validation.token("refresh_token", request.refresh_token)
        )
        # the end user's credential: its failures count against its session only when its
        # MAC proves which session it is (a forged token naming someone else's session id
        # must not lock that session out); anything else counts against the relay alone
        proven = presented is not None and presented.genuine
        self.guard.presenting(f"session:{presented.session_id}" if proven and presented else "")
        if presented is None:
            raise NotAuthenticated(AuthFailure.MALFORMED)
        if presented.generation and not presented.genuine:
            raise NotAuthenticated(AuthFailure.UNKNOWN)  # not one the service made: no Redis trip
        if presented.generation and presented.ends_at * 1000 <= self.clock() * 1000:
            # the session ended (its family may have left Redis long ago): not a guess
            raise NotAuthenticated(AuthFailure.EXPIRED)
        sid, caller = presented.session_id, current_caller()
        generation, ends_at = presented.generation + 1, presented.ends_at
        self.minter.ready()  # before the family rotates: an HSM outage burns no token
        rotation, successor = await self._rotate(presented, generation, ends_at)
        if rotation.status is RefreshStatus.REGEN:  # a v1 token, or an older version's
            generation, ends_at = rotation.generation + 1, rotation.family_expires_ms // 1000
            rotation, successor = await self._rotate(presented, generation, ends_at)
        if rotation.status is RefreshStatus.REUSE:
            self.audit.record(
                "reuse_detected",
                peer=caller.name,
                subject=rotation.subject,
                session_id=sid,
                reason="family revoked",
            )
            raise NotAuthenticated(AuthFailure.REUSED)
        if rotation.status is RefreshStatus.MISMATCH:
            # counted against this session as this peer presents it (and the peer's bulk
            # budget): a thief of a bound token cannot lock its holder out, nor a relay's
            # user who sends someone else's bound token the relay's other users
            self.guard.mismatched()
            raise NotAuthenticated(AuthFailure.CERTIFICATE_MISMATCH)
        if rotation.status is RefreshStatus.REPLAYED:
            replayed = self.refresh_tokens.unseal(
                presented, rotation.generation, rotation.family_expires_ms // 1000, rotation.sealed
            )
            if replayed is None:
                raise RuntimeError(f"sealed successor of sid={sid} does not open")
            successor = replayed
            self.audit.record(
                "refresh_replayed", peer=caller.name, subject=rotation.subject, session_id=sid
            )
        elif rotation.status is not RefreshStatus.OK:
            log.info("refresh refused sid=%s status=%s", sid, rotation.status.value)
            raise NotAuthenticated(AuthFailure(rotation.status.value))
        else:
            self.audit.record(
                "refreshed", peer=caller.name, subject=rotation.subject, session_id=sid
            )
        assert rotation.claims is not None  # OK and REPLAYED carry them
        access, access_exp = await self.minter.mint(
            rotation.claims, sid, rotation.now_ms // 1000, rotation.family_expires_ms
        )
        return pb.RefreshResponse(
            tokens=self.minter.pair(access, access_exp, successor, rotation.token_expires_ms, sid)
        )

    async def _rotate(
        self, presented: tokens.PresentedRefresh, generation: int, ends_at: int
    ) -> tuple[Rotation, str]:
        """One rotation attempt with a successor of ``generation`` carrying the family end
        ``ends_at``: (outcome, successor)."""
        successor = self.refresh_tokens.new(presented.session_id, generation, ends_at)
        sealed = tokens.RefreshTokens.seal(presented.token, successor) if self.grace_ms else b""
        rotation = await self.store.rotate(
            presented.session_id,
            Presented(presented.hash, presented.generation, presented.genuine),
            Successor(tokens.refresh_hash(successor), generation, ends_at, sealed),
            int(self.clock() * 1000),
            self.idle_ttl_ms,
            current_caller().peer.thumbprint,
            self.grace_ms,
        )
        return rotation, successor
