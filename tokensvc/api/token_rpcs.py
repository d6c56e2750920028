"""Issue, Revoke, Introspect and GetKeys: the token RPCs every workload uses.

An RPC group of :class:`tokensvc.api.servicer.TokenService`. Each RPC does at most one Redis
round trip on its normal path (Issue: one script; Introspect: one pipeline in one hash slot;
GetKeys: none).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc.aio

from tokensvc.api import validation
from tokensvc.api.admission import Caller, current_caller
from tokensvc.api.minting import Minter, Verification, holds
from tokensvc.api.ports import Clock, TokenStore
from tokensvc.api.times import ts as _ts
from tokensvc.config import Settings
from tokensvc.errors import BadRequest, Denial, LimitKind, RateLimited, SubjectLocked
from tokensvc.families import tokens
from tokensvc.keys.ring import KeyRing
from tokensvc.observe.audit import AuditTrail
from tokensvc.store import IssueStatus, Limit, NewFamily
from tokensvc_client.errors import InvalidToken
from tokensvc_client.peer import is_thumbprint
from tokensvc_client.v1 import tokensvc_pb2 as pb

log = logging.getLogger("tokensvc.service")
IssueCtx = grpc.aio.ServicerContext[pb.IssueRequest, pb.IssueResponse]
KeysCtx = grpc.aio.ServicerContext[pb.GetKeysRequest, pb.GetKeysResponse]


class TokenRpcs:
    """Issue, Revoke, Introspect, GetKeys."""

    def __init__(
        self,
        settings: Settings,
        store: TokenStore,
        keyring: KeyRing,
        audit: AuditTrail,
        minter: Minter,
        verification: Verification,
        refresh_tokens: tokens.RefreshTokens,
        subject_tags: tokens.SubjectTags,
        *,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.keyring = keyring
        self.audit = audit
        self.minter = minter
        self.verification = verification
        self.refresh_tokens = refresh_tokens
        self.subject_tags = subject_tags
        self.clock = clock
        self.issue_limit = Limit.of(settings.rate_issue.count, settings.rate_issue.period)
        self.subject_ttl_ms = (settings.family_max_age + settings.leeway) * 1000

    async def issue(self, request: pb.IssueRequest, context: IssueCtx) -> pb.IssueResponse:
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
            tokens.access_token_size(self.minter.claims(base, sid, now, family_exp_ms))
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
        self.minter.ready()  # a known HSM outage refuses before the family is written
        outcome = await self.store.create(
            family, self.issue_limit, tokens.SubjectTags.legacy(subject)
        )
        if outcome.status is IssueStatus.LOCKED:
            self.audit.record(
                "denied",
                peer=caller.name,
                subject=subject,
                reason="locked",
                rpc="Issue",
                code=Denial.SUBJECT_LOCKED,
            )
            raise SubjectLocked()
        if outcome.status is IssueStatus.LIMITED:
            self.audit.record(
                "rate_limited",
                peer=caller.name,
                subject=subject,
                reason=LimitKind.ISSUE,
                rpc="Issue",
            )
            raise RateLimited(
                "too many tokens issued for this subject", outcome.retry_after_ms, LimitKind.ISSUE
            )
        # signed only once stored (a refused Issue costs no signature), dated by Redis
        access, access_exp = await self.minter.mint(
            base, sid, outcome.created_ms // 1000, family_exp_ms
        )
        self.audit.record(
            "issued",
            peer=caller.name,
            subject=subject,
            session_id=sid,
            bound=int(bool(cnf)),
            client_id=base["client_id"],
        )
        self.minter.announce_grace(context)
        return pb.IssueResponse(
            tokens=self.minter.pair(access, access_exp, refresh, refresh_exp_ms, sid)
        )

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

    async def revoke(self, request: pb.RevokeRequest) -> pb.RevokeResponse:
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
        tokens_revoked = int("jti" in audit)  # an access token, revoked by its jti
        return pb.RevokeResponse(revoked_sessions=count, revoked_access_tokens=tokens_revoked)

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
            claims = await self.verification.verify(token)
        except InvalidToken:
            return 0
        await self.store.revoke_jti(claims.session_id, claims.token_id, claims.expires_at, now_ms)
        audit.update(session_id=claims.session_id, jti=claims.token_id, subject=claims.subject)
        return 0  # no session: the answer's revoked_access_tokens says 1 (audit["jti"])

    async def introspect(self, request: pb.IntrospectRequest) -> pb.IntrospectResponse:
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
            if not holds(described.cnf_x5t_s256):
                # RFC 7662 answers per caller: a bound refresh token is only active for the
                # workload holding its certificate, so it reveals nothing to anyone else
                log.info("introspect: sid=%s inactive reason=certificate_mismatch", sid)
                return pb.IntrospectResponse(active=False)
            return described
        try:
            claims = await self.verification.verify(token)
        except InvalidToken as err:
            log.info("introspect: inactive token reason=%s", err.reason.value)
            return pb.IntrospectResponse(active=False)
        state = await self.store.access_state(claims.session_id, claims.token_id, int(now_f * 1000))
        if state.active and await self.verification.keyring.catch_up(state.ring_version):
            try:  # the ring changed (e.g. an emergency key revocation): is the key still in it?
                claims = await self.verification.verify(token)
            except InvalidToken as err:
                log.info("introspect: inactive token reason=%s", err.reason.value)
                return pb.IntrospectResponse(active=False)
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

    async def get_keys(self, request: pb.GetKeysRequest, context: KeysCtx) -> pb.GetKeysResponse:
        self.minter.announce_grace(context)
        return pb.GetKeysResponse(
            jwks=self.keyring.jwks_json, max_age_seconds=self.settings.jwks_max_age
        )
