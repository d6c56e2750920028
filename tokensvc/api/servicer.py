"""The gRPC servicer: request validation, token minting and the family store glued together.

Each RPC does at most one Redis round trip on its normal path (Issue: one script; Refresh:
one script; Introspect: one pipeline in one hash slot; GetKeys: none).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any

import grpc.aio

from tokensvc.api import validation
from tokensvc.api.admin import AdminRpcs
from tokensvc.api.admission import Caller, Guard, current_caller
from tokensvc.api.refresh import RefreshRpcs
from tokensvc.api.revocation_hub import RevocationHub
from tokensvc.api.sessions import SessionRpcs
from tokensvc.api.status import BadRequest, RateLimited, ServiceError, rpc
from tokensvc.api.times import ts as _ts
from tokensvc.config import Settings
from tokensvc.families import tokens
from tokensvc.keys.ring import KeyRing, Lifecycle, SigningUnavailable
from tokensvc.observe.audit import AuditTrail
from tokensvc.security.policy import CallerPolicy
from tokensvc.store import (
    FamilyStore,
    IssueStatus,
    Limit,
    NewFamily,
)
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.peer import is_thumbprint
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc
from tokensvc_client.verifier import Claims, Verifier
from tokensvc_client.wire import GRACE_HEADER

log = logging.getLogger("tokensvc.service")
Ctx = grpc.aio.ServicerContext[Any, Any]


class KeyUnavailable(ServiceError):
    """The signing key's holder (a PKCS#11 token) cannot sign now: nothing was signed."""

    code = grpc.StatusCode.UNAVAILABLE


class SubjectLocked(ServiceError):
    """Issue for a locked subject (not a failed authentication of the caller)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class TokenService(AdminRpcs, SessionRpcs, RefreshRpcs, pb_grpc.TokenServiceServicer):
    """Implements tokensvc.v1.TokenService on a key ring and a family store.

    Every RPC is admitted first by the :class:`~tokensvc.api.admission.Guard` (caller policy,
    rate limits; see :func:`tokensvc.api.status.rpc`), and what it does is audited.
    """

    def __init__(
        self,
        settings: Settings,
        store: FamilyStore,
        keyring: KeyRing,
        audit: AuditTrail,
        policy: CallerPolicy | None = None,
        hub: RevocationHub | None = None,
        *,
        clock: Any = time.time,
    ) -> None:
        self.settings = settings
        self.hub = hub or RevocationHub(
            store.redis, max_per_client=settings.max_watchers_per_client
        )
        self.store = store
        self.keyring = keyring
        self.audit = audit
        self.clock = clock
        self.guard = Guard(settings, store, audit, policy or CallerPolicy.default())
        self.issue_limit = Limit.of(settings.rate_issue.count, settings.rate_issue.period)
        self.subject_ttl_ms = (settings.family_max_age + settings.leeway) * 1000
        self.lifecycle = Lifecycle.from_settings(settings)
        self.refresh_tokens = tokens.RefreshTokens(keyring.secret("refresh-mac"))
        self.subject_tags = tokens.SubjectTags(keyring.secret("subject-tag"))
        self.grace_ms = settings.refresh_grace_seconds * 1000
        # with a window, every Refresh/Issue/GetKeys answer announces it: clients retry a
        # Refresh whose reply was lost only when the server will answer it idempotently
        # (strict mode sends nothing: no header means strict)
        grace = settings.refresh_grace_seconds
        self._grace_md = ((GRACE_HEADER, str(grace)),) if grace else ()
        self.verifier = Verifier(
            settings.issuer,
            None,
            leeway=settings.leeway,
            max_token_bytes=validation.MAX_TOKEN,
            clock=clock,
        )
        #: for tokens presented to tokensvc itself (ListSessions' self-service path)
        self.own_verifier = Verifier(
            settings.issuer,
            settings.self_audience,
            leeway=settings.leeway,
            max_token_bytes=validation.MAX_TOKEN,
            clock=clock,
        )

    # -- admission (see tokensvc.api.status.Guarded) -------------------------------------------

    async def admit(self, rpc: str, context: Ctx) -> None:
        await self.guard.admit(rpc, context)

    async def rejected(self, rpc: str, err: ServiceError) -> None:
        await self.guard.rejected(rpc, err)

    # -- minting -----------------------------------------------------------------------

    def _claims(
        self, base: dict[str, Any], sid: str, now: int, family_expires_ms: int
    ) -> dict[str, Any]:
        """An access token's claims; it never outlives its family. ``now``: Redis's clock
        (the subject watermark's), so a replica's skewed clock cannot date it."""
        return {
            "iss": self.settings.issuer,
            **base,
            "exp": min(now + self.settings.access_ttl, family_expires_ms // 1000),
            "iat": now,
            "nbf": now,
            "jti": tokens.new_token_id(),
            "sid": sid,
        }

    async def _mint(
        self, base: dict[str, Any], sid: str, now: int, family_expires_ms: int
    ) -> tuple[str, int]:
        """Sign an access token (see :meth:`_claims`); returns it and its expiry."""
        claims = self._claims(base, sid, now, family_expires_ms)
        try:
            return await self.keyring.sign_token(claims), claims["exp"]
        except SigningUnavailable as err:  # the pool and health log each change of state
            log.debug("signing key unavailable sid=%s: %s", sid, err)
            raise KeyUnavailable("signing key unavailable; retry later") from None

    def _signer_ready(self) -> None:
        """Refuse before anything changes in Redis when the signing key's token is known
        to be down (see KeyRing.check_signing)."""
        try:
            self.keyring.check_signing()
        except SigningUnavailable as err:
            log.debug("signing key unavailable: %s", err)
            raise KeyUnavailable("signing key unavailable; retry later") from None

    def _pair(
        self, access: str, access_exp: int, refresh: str, refresh_exp_ms: int, sid: str
    ) -> pb.TokenPair:
        return pb.TokenPair(
            access_token=access,
            refresh_token=refresh,
            token_type="Bearer",
            access_expires_at=_ts(access_exp),
            refresh_expires_at=_ts(refresh_exp_ms / 1000),
            session_id=sid,
        )

    # -- RPCs ----------------------------------------------------------------------------

    @rpc
    async def Issue(self, request: pb.IssueRequest, context: Ctx) -> pb.IssueResponse:
        subject = validation.text("subject", request.subject, required=True)
        base: dict[str, Any] = {
            "sub": subject,
            "aud": validation.text_list("audience", request.audience, limit=validation.MAX_ID)
            or list(self.settings.audience),
            "client_id": validation.text("client_id", request.client_id),
            "roles": validation.text_list("roles", request.roles),
        }
        if request.acr:
            base["acr"] = validation.text("acr", request.acr, limit=validation.MAX_SHORT)
        if request.amr:
            base["amr"] = validation.text_list("amr", request.amr)
        if request.HasField("auth_time"):
            auth_time = request.auth_time.seconds
            if not 0 < auth_time <= self.clock() + self.settings.leeway:
                raise BadRequest("auth_time must be a past instant")
            base["auth_time"] = auth_time
        label = validation.text("session_label", request.session_label)
        caller = current_caller()
        cnf = self._binding(request, caller)
        if cnf:
            base["cnf"] = {"x5t#S256": cnf}

        now_f = self.clock()
        now, now_ms = int(now_f), int(now_f * 1000)
        sid = tokens.new_session_id(self.subject_tags.of(subject))
        family_exp_ms = now_ms + self.settings.family_max_age * 1000
        refresh = self.refresh_tokens.new(sid, 1, family_exp_ms // 1000)
        refresh_exp_ms = min(now_ms + self.settings.refresh_idle_ttl * 1000, family_exp_ms)
        if (
            tokens.access_token_size(self._claims(base, sid, now, family_exp_ms))
            > validation.MAX_TOKEN
        ):
            # every field is within its limit but together they make a token verifiers
            # would refuse as too large: refuse to issue it instead
            raise BadRequest(
                f"roles/audience/amr together exceed the {validation.MAX_TOKEN}-byte token limit"
            )
        family = NewFamily(
            sid,
            tokens.refresh_hash(refresh),
            subject,
            base["client_id"],
            label,
            base,
            now_ms,
            refresh_exp_ms,
            family_exp_ms,
            cnf,
        )
        self._signer_ready()
        outcome = await self.store.create(
            family, self.issue_limit, tokens.SubjectTags.legacy(subject)
        )
        if outcome.status is IssueStatus.LOCKED:
            self.audit.record("denied", peer=caller.name, subject=subject, reason="locked")
            raise SubjectLocked("subject is locked")
        if outcome.status is IssueStatus.LIMITED:
            self.audit.record("rate_limited", peer=caller.name, subject=subject, reason="Issue")
            raise RateLimited("too many tokens issued for this subject", outcome.retry_after_ms)
        # signed only once stored (a refused Issue costs no signature), dated by Redis
        access, access_exp = await self._mint(base, sid, outcome.created_ms // 1000, family_exp_ms)
        self.audit.record(
            "issued",
            peer=caller.name,
            subject=subject,
            session_id=sid,
            bound=int(bool(cnf)),
            client_id=base["client_id"],
        )
        self._announce_grace(context)
        return pb.IssueResponse(tokens=self._pair(access, access_exp, refresh, refresh_exp_ms, sid))

    @staticmethod
    def _binding(request: pb.IssueRequest, caller: Caller) -> str:
        """The certificate thumbprint to bind the family to ('' for none), RFC 8705."""
        if request.bind_to_client_certificate and request.cnf_x5t_s256:
            raise BadRequest("bind_to_client_certificate and cnf_x5t_s256 are exclusive")
        if request.cnf_x5t_s256:
            if not is_thumbprint(request.cnf_x5t_s256):
                raise BadRequest("cnf_x5t_s256 must be a base64url SHA-256 thumbprint")
            return request.cnf_x5t_s256
        if request.bind_to_client_certificate:
            if not caller.peer.thumbprint:
                raise BadRequest("bind_to_client_certificate needs an mTLS client certificate")
            return caller.peer.thumbprint
        return ""

    @rpc
    async def Revoke(self, request: pb.RevokeRequest, context: Ctx) -> pb.RevokeResponse:
        reason = validation.text("reason", request.reason, limit=validation.MAX_REASON) or "revoked"
        now_ms = int(self.clock() * 1000)
        target = request.WhichOneof("target")
        audit: dict[str, str] = {}
        if target == "token":
            count = await self._revoke_token(
                validation.token("token", request.token), now_ms, reason, audit
            )
        elif target == "session_id":
            sid = validation.text("session_id", request.session_id, required=True)
            if not tokens.is_session_id(sid):
                raise BadRequest("session_id is not a session id")
            count = await self.store.revoke_sessions([sid], now_ms, reason)
            audit["session_id"] = sid
        elif target == "subject":
            subject = validation.text("subject", request.subject, required=True)
            count = await self.store.revoke_subject(
                self.subject_tags.of(subject),
                tokens.SubjectTags.legacy(subject),
                now_ms,
                reason,
                self.subject_ttl_ms,
            )
            audit["subject"] = subject
        else:
            raise BadRequest("target is required: token, session_id or subject")
        self.audit.record(
            "revoked",
            peer=current_caller().name,
            reason=reason,
            target=target,
            sessions=count,
            **audit,
        )
        return pb.RevokeResponse(revoked_sessions=count)

    async def _revoke_token(
        self, token: str, now_ms: int, reason: str, audit: dict[str, str]
    ) -> int:
        """Revoke a refresh token's family or an access token's jti (RFC 7009: an invalid
        token is not an error, there is simply nothing to revoke)."""
        presented = self.refresh_tokens.parse(token)
        if presented is not None:
            audit["session_id"] = presented.session_id
            if presented.generation and not presented.genuine:
                return 0  # not a token the service made
            return await self.store.revoke_sessions(
                [presented.session_id],
                now_ms,
                reason,
                presented.hash,
                presented.generation if presented.genuine else 0,
            )
        try:
            claims = await self._verify(token)
        except InvalidToken:
            return 0
        await self.store.revoke_jti(claims.session_id, claims.token_id, claims.expires_at, now_ms)
        audit.update(session_id=claims.session_id, jti=claims.token_id, subject=claims.subject)
        return 0

    @rpc
    async def Introspect(
        self, request: pb.IntrospectRequest, context: Ctx
    ) -> pb.IntrospectResponse:
        token = validation.token("token", request.token)
        now_f = self.clock()
        presented = self.refresh_tokens.parse(token)
        if presented is not None:
            if presented.generation and not presented.genuine:
                return pb.IntrospectResponse(active=False)
            sid = presented.session_id
            family = await self.store.refresh_state(sid, presented.hash, int(now_f * 1000))
            if family is None:
                return pb.IntrospectResponse(active=False)
            described = self._describe_refresh(sid, family)
            if not self._holds(described.cnf_x5t_s256):
                # RFC 7662 answers per caller: a bound refresh token is only active for the
                # workload holding its certificate, so it reveals nothing to anyone else
                log.info("introspect: sid=%s inactive reason=certificate_mismatch", sid)
                return pb.IntrospectResponse(active=False)
            return described
        try:
            claims = await self._verify(token)
        except InvalidToken as err:
            log.info("introspect: inactive token reason=%s", err.reason.value)
            return pb.IntrospectResponse(active=False)
        state = await self.store.access_state(claims.session_id, claims.token_id, int(now_f * 1000))
        if not state.active:
            log.info("introspect: jti=%s inactive reason=%s", claims.token_id, state.reason)
            return pb.IntrospectResponse(active=False)
        return pb.IntrospectResponse(
            active=True,
            token_type="access",
            subject=claims.subject,
            roles=claims.roles,
            audience=claims.audience,
            issuer=claims.issuer,
            client_id=claims.client_id,
            session_id=claims.session_id,
            token_id=claims.token_id,
            acr=claims.acr,
            amr=claims.amr,
            issued_at=_ts(claims.issued_at),
            expires_at=_ts(claims.expires_at),
            not_before=_ts(claims.not_before),
            cnf_x5t_s256=claims.cnf_x5t_s256,
        )

    def _describe_refresh(self, sid: str, family: dict[str, str]) -> pb.IntrospectResponse:
        base = json.loads(family["claims"])
        return pb.IntrospectResponse(
            active=True,
            token_type="refresh",
            subject=base["sub"],
            roles=base.get("roles", []),
            audience=base.get("aud", []),
            issuer=self.settings.issuer,
            client_id=base.get("client_id", ""),
            session_id=sid,
            acr=base.get("acr", ""),
            amr=base.get("amr", []),
            cnf_x5t_s256=base.get("cnf", {}).get("x5t#S256", ""),
            issued_at=_ts(int(family["last"]) / 1000),
            expires_at=_ts(int(family["cur_exp"]) / 1000),
        )

    @staticmethod
    def _holds(bound: str) -> bool:
        """Whether the caller presents the certificate ``bound`` names (true if unbound)."""
        presented = current_caller().peer.thumbprint
        # bytes: compare_digest refuses str with non-ASCII characters
        return not bound or hmac.compare_digest(bound.encode(), presented.encode())

    async def _verify(self, token: str, verifier: Verifier | None = None) -> Claims:
        """Verify with the ring's public keys, reloading the ring once on an unknown kid
        (``verifier``: another audience than the default none, e.g. tokensvc's own)."""
        verifier = verifier or self.verifier
        try:
            return verifier.verify(token, self.keyring.public)
        except InvalidToken as err:
            if err.reason is not Reason.UNKNOWN_KEY or not await self.keyring.reload_if_stale():
                raise
        return verifier.verify(token, self.keyring.public)

    @rpc
    async def GetKeys(self, request: pb.GetKeysRequest, context: Ctx) -> pb.GetKeysResponse:
        self._announce_grace(context)
        return pb.GetKeysResponse(
            jwks=self.keyring.jwks_json, max_age_seconds=self.settings.jwks_max_age
        )
