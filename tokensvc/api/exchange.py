"""Exchange and MintTransactionToken: authority for each hop of a call chain
(docs/call-chains.md).

An RPC group of :class:`tokensvc.api.servicer.TokenService`.

- **Exchange** (RFC 8693 token exchange): a workload trades an access token it received
  for one to call another audience. The result is never broader than the subject token:
  an audience the exchange policy lets this workload ask for, roles a subset, ``exp`` no
  later, the same ``sid`` (revoking the session revokes it), ``cnf`` bound to the
  caller's certificate when it presents one, and an ``act`` claim naming the caller on
  top of the subject token's actors (RFC 8693 4.1), at most ``--max-act-depth`` deep.
  Without ``act`` (impersonation) only where the policy says so.
- **MintTransactionToken** (draft-ietf-oauth-transaction-tokens-10): a Transaction Token
  (``typ: txntoken+jwt``) for one request's call chain: at the edge from a user's access
  token, for a workload acting on its own, or as a replacement that only narrows a
  Transaction Token (same ``txn``, ``sub``, ``aud``, ``tctx``, ``rctx`` and session; scope
  a subset; ``exp`` no later; the requesting workload appended to ``req_wl_chain``).
  ``req_wl`` is always the caller's mTLS identity, never a request field.

Refresh tokens are never a subject token; a Transaction Token is never an access token
nor the other way round (the verifier's ``typ`` rules). Each RPC does one Redis round trip
(the subject token's revocation state, one pipeline in one hash slot) and one signature.
Refusals are PERMISSION_DENIED with reason ``exchange_policy``, audited ``exchange_denied``;
successes are audited ``exchanged`` and ``txn_token_minted`` with the transaction id.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from typing import Any, Final

from opentelemetry import trace

from tokensvc.api import validation
from tokensvc.api.admission import Caller, current_caller
from tokensvc.api.minting import Minter, Verification
from tokensvc.api.ports import Clock, SessionReads
from tokensvc.api.times import ts
from tokensvc.config import Settings
from tokensvc.errors import AuthFailure, BadRequest, Denial, Denied, NotAuthenticated
from tokensvc.families import tokens
from tokensvc.observe.audit import AuditTrail
from tokensvc.security.policy import CallerPolicy, ExchangeRule, TransactionRule
from tokensvc_client.errors import InvalidToken
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import TXN_TOKEN_TYPE, Claims, strict_json_object

log = logging.getLogger("tokensvc.service")

#: RFC 8693 section 3 token type identifiers, and the draft's.
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
REFRESH_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:refresh_token"
TXN_TOKEN_TYPE_URI: Final = "urn:ietf:params:oauth:token-type:txn_token"
#: tokensvc's own: the caller's mTLS identity is the subject (a workload acting alone).
WORKLOAD_TOKEN_TYPE: Final = "urn:tokensvc:params:oauth:token-type:workload"
#: Span and audit attribute carrying the transaction id.
TXN_ATTRIBUTE: Final = "tokensvc.txn"


def _refused(err: InvalidToken) -> NotAuthenticated:
    return NotAuthenticated(AuthFailure(err.reason.value))


class CallChainRpcs:
    """Exchange, MintTransactionToken."""

    def __init__(
        self,
        settings: Settings,
        store: SessionReads,
        audit: AuditTrail,
        minter: Minter,
        verification: Verification,
        policy: CallerPolicy,
        *,
        clock: Clock,
    ) -> None:
        self.store = store
        self.audit = audit
        self.minter = minter
        self.verification = verification
        self.policy = policy
        self.clock = clock
        self.enforce = not settings.insecure
        self.issuer = settings.issuer
        self.access_ttl = settings.access_ttl
        self.trust_domain = settings.trust_domain
        self.txn_ttl = settings.txn_token_ttl
        self.txn_ttl_cap = settings.txn_token_ttl_cap
        self.max_act_depth = settings.max_act_depth
        self.max_context = settings.max_txn_context_bytes

    # -- shared -------------------------------------------------------------------------

    @staticmethod
    def _identity(caller: Caller) -> str:
        """The caller's workload identity; in plaintext development mode (no identities)
        ``insecure:`` and its address."""
        return caller.peer.identity or f"insecure:{caller.address}"

    def _deny(self, rpc: str, caller: Caller, message: str, **fields: str) -> Denied:
        self.audit.record("exchange_denied", peer=caller.name, reason=message, rpc=rpc, **fields)
        return Denied(Denial.EXCHANGE, message)

    async def _subject_access_token(self, token: str) -> Claims:
        """A valid, unrevoked access token.

        Its certificate binding is not checked against the caller: a token exchanged by the
        previous hop is bound to *that* workload (which presented it to this one), so the
        caller could never prove possession. What keeps a stolen token out is its audience:
        the policy only lets a workload exchange tokens addressed to it
        (``subject_audiences``), i.e. tokens it was sent.
        """
        try:
            claims = await self.verification.verify(validation.token("subject_token", token))
        except InvalidToken as err:
            raise _refused(err) from None
        await self._live(claims.session_id, claims.token_id)
        return claims

    async def _live(self, sid: str, jti: str) -> None:
        state = await self.store.access_state(sid, jti, int(self.clock() * 1000))
        if not state.active:
            log.info("exchange: sid=%s jti=%s inactive reason=%s", sid, jti, state.reason)
            raise NotAuthenticated(AuthFailure.REVOKED)

    # -- Exchange -----------------------------------------------------------------------

    async def exchange(self, request: pb.ExchangeRequest) -> pb.ExchangeResponse:
        if request.subject_token_type not in ("", ACCESS_TOKEN_TYPE):
            raise BadRequest(f"subject_token_type must be {ACCESS_TOKEN_TYPE}")
        audience = validation.text_list("audience", request.audience, limit=validation.MAX_ID)
        if not audience:
            raise BadRequest("audience is required")
        wanted = validation.text_list("roles", request.roles)
        caller = current_caller()
        subject = await self._subject_access_token(request.subject_token)
        me = self._identity(caller)
        ids = {"subject": subject.subject, "session_id": subject.session_id}
        rule = self._exchange_rule(caller, me, subject, audience, request.impersonate, ids)
        cap = rule.roles if rule is not None else None
        roles = wanted or [r for r in subject.roles if cap is None or r in cap]
        if not set(roles) <= set(subject.roles):
            raise self._deny(
                "Exchange", caller, "roles must be a subset of the subject token's", **ids
            )
        if cap is not None and not set(roles) <= cap:
            raise self._deny("Exchange", caller, "roles beyond what the policy lets pass", **ids)
        actors = subject.actors if request.impersonate else (me, *subject.actors)
        if len(actors) > self.max_act_depth:
            raise self._deny(
                "Exchange", caller, f"act chain deeper than {self.max_act_depth}", **ids
            )

        now = int(self.clock())
        claims = self._exchanged_claims(subject, audience, roles, actors, caller, now)
        token = await self.minter.sign(claims)
        if len(token) > validation.MAX_TOKEN:
            raise BadRequest(f"the exchanged token would exceed {validation.MAX_TOKEN} bytes")
        self.audit.record(
            "exchanged",
            peer=caller.name,
            jti=claims["jti"],
            audience=",".join(audience),
            depth=len(actors),
            impersonated=int(request.impersonate),
            bound=int("cnf" in claims),
            **ids,
        )
        return pb.ExchangeResponse(
            access_token=token,
            issued_token_type=ACCESS_TOKEN_TYPE,
            token_type="Bearer",
            expires_at=ts(claims["exp"]),
            session_id=subject.session_id,
            roles=roles,
        )

    def _exchange_rule(
        self,
        caller: Caller,
        me: str,
        subject: Claims,
        audience: list[str],
        impersonate: bool,
        ids: dict[str, str],
    ) -> ExchangeRule | None:
        """The caller's ``[exchange]`` table if it allows this exchange (None: not enforced
        in plaintext development mode).

        Raises:
            Denied: no table, or the request goes beyond it.
        """
        if not self.enforce:
            return None
        rule = self.policy.exchange.get(me)
        if rule is None:
            raise self._deny("Exchange", caller, "no exchange policy for this workload", **ids)
        if not rule.subject_audiences.intersection(subject.audience):
            raise self._deny(
                "Exchange", caller, "subject token is not addressed to this workload", **ids
            )
        if not set(audience) <= rule.audiences:
            raise self._deny("Exchange", caller, "audience not allowed for this workload", **ids)
        if impersonate and not rule.impersonate:
            raise self._deny("Exchange", caller, "impersonation not allowed", **ids)
        return rule

    def _exchanged_claims(
        self,
        subject: Claims,
        audience: list[str],
        roles: list[str],
        actors: tuple[str, ...],
        caller: Caller,
        now: int,
    ) -> dict[str, Any]:
        raw = subject.raw
        claims: dict[str, Any] = {"iss": self.issuer, "sub": subject.subject, "aud": audience}
        for name in ("client_id", "acr", "amr", "auth_time"):
            if name in raw:
                claims[name] = raw[name]
        claims["roles"] = roles
        if caller.peer.thumbprint:  # bound to the workload that will present it
            claims["cnf"] = {"x5t#S256": caller.peer.thumbprint}
        act = _nested_act(actors)
        if act is not None:
            claims["act"] = act
        claims.update(
            exp=min(now + self.access_ttl, subject.expires_at),
            iat=now,
            nbf=now,
            jti=tokens.new_token_id(),
            sid=subject.session_id,
        )
        return claims

    # -- MintTransactionToken -----------------------------------------------------------

    async def mint_transaction_token(
        self, request: pb.MintTransactionTokenRequest
    ) -> pb.MintTransactionTokenResponse:
        kind = request.subject_token_type or ACCESS_TOKEN_TYPE
        if kind == REFRESH_TOKEN_TYPE:
            raise BadRequest("a refresh token is never a subject token")
        if kind not in (ACCESS_TOKEN_TYPE, TXN_TOKEN_TYPE_URI, WORKLOAD_TOKEN_TYPE):
            raise BadRequest(
                f"subject_token_type must be {ACCESS_TOKEN_TYPE}, {TXN_TOKEN_TYPE_URI} "
                f"or {WORKLOAD_TOKEN_TYPE}"
            )
        if request.audience and request.audience != self.trust_domain:
            raise BadRequest(f"audience must be the trust domain {self.trust_domain!r}")
        scope = validation.text_list("scope", request.scope)
        if not scope:
            raise BadRequest("scope is required")
        if any(" " in s for s in scope):
            raise BadRequest("a scope value must not contain spaces")
        if request.lifetime_seconds < 0:
            raise BadRequest("lifetime_seconds must not be negative")
        lifetime = min(request.lifetime_seconds or self.txn_ttl, self.txn_ttl_cap)
        caller = current_caller()
        now = int(self.clock())
        if kind == TXN_TOKEN_TYPE_URI:
            claims = await self._replacement(request, scope, caller, now, lifetime)
        else:
            claims = await self._original(request, kind, scope, caller, now, lifetime)
        token = await self.minter.sign(claims, TXN_TOKEN_TYPE)
        if len(token) > validation.MAX_TOKEN:
            raise BadRequest(f"the Transaction Token would exceed {validation.MAX_TOKEN} bytes")
        trace.get_current_span().set_attribute(TXN_ATTRIBUTE, claims["txn"])
        self.audit.record(
            "txn_token_minted",
            peer=caller.name,
            subject=claims["sub"],
            session_id=claims.get("sid", ""),
            jti=claims["jti"],
            txn=claims["txn"],
            replaced=int(kind == TXN_TOKEN_TYPE_URI),
        )
        return pb.MintTransactionTokenResponse(
            txn_token=token,
            issued_token_type=TXN_TOKEN_TYPE_URI,
            token_type="N_A",
            expires_at=ts(claims["exp"]),
            txn=claims["txn"],
        )

    async def _original(
        self,
        request: pb.MintTransactionTokenRequest,
        kind: str,
        scope: list[str],
        caller: Caller,
        now: int,
        lifetime: int,
    ) -> dict[str, Any]:
        """A new transaction: from an access token (the edge) or the caller itself."""
        me = self._identity(caller)
        rule = self.policy.transaction_tokens.get(me) if self.enforce else None
        if self.enforce and rule is None:
            raise self._deny(
                "MintTransactionToken", caller, "no transaction_tokens policy for this workload"
            )
        tctx = self._context("request_details", request.request_details)
        rctx = self._context("request_context", request.request_context)
        claims: dict[str, Any] = {"iss": self.issuer, "iat": now}
        if kind == WORKLOAD_TOKEN_TYPE:
            if request.subject_token:
                raise BadRequest("a workload's own transaction takes no subject_token")
            if rule is not None and not set(scope) <= rule.own_scopes:
                raise self._deny(
                    "MintTransactionToken", caller, "scope beyond the workload's own scopes"
                )
            claims.update(exp=now + lifetime, sub=me)
        else:
            subject = await self._subject_access_token(request.subject_token)
            ids = {"subject": subject.subject, "session_id": subject.session_id}
            if rule is not None and not rule.subject_audiences.intersection(subject.audience):
                raise self._deny(
                    "MintTransactionToken",
                    caller,
                    "subject token is not addressed to this workload",
                    **ids,
                )
            # the draft: the scope never exceeds the subject token's (its roles here)
            if not set(scope) <= set(subject.roles):
                raise self._deny(
                    "MintTransactionToken", caller, "scope beyond the subject token's roles", **ids
                )
            if rule is not None and rule.scopes is not None and not set(scope) <= rule.scopes:
                raise self._deny(
                    "MintTransactionToken", caller, "scope beyond what the policy allows", **ids
                )
            # a transaction never outlives the authority it came from
            claims.update(
                exp=min(now + lifetime, subject.expires_at),
                sub=subject.subject,
                sid=subject.session_id,
            )
        claims.update(
            aud=self.trust_domain,
            txn=str(uuid.uuid4()),
            scope=" ".join(scope),
            req_wl=me,
            tctx=tctx,
            rctx=rctx,
            jti=tokens.new_token_id(),
        )
        return claims

    async def _replacement(
        self,
        request: pb.MintTransactionTokenRequest,
        scope: list[str],
        caller: Caller,
        now: int,
        lifetime: int,
    ) -> dict[str, Any]:
        """A replacement that only narrows (the draft, "Txn-Token as a subject_token")."""
        if request.request_details or request.request_context:
            raise BadRequest("a replacement keeps the transaction's tctx and rctx: omit both")
        token = validation.token("subject_token", request.subject_token)
        try:
            old = await self.verification.verify_transaction(token)
        except InvalidToken as err:
            raise _refused(err) from None
        if old.session_id:
            await self._live(old.session_id, old.token_id)
        me = self._identity(caller)
        fields = {"subject": old.subject, "session_id": old.session_id, "txn": old.transaction_id}
        if self.enforce:
            rule: TransactionRule | None = self.policy.transaction_tokens.get(me)
            if rule is None or not rule.replace:
                raise self._deny(
                    "MintTransactionToken", caller, "replacement not allowed", **fields
                )
        if not set(scope) <= set(old.scope):
            raise self._deny(
                "MintTransactionToken", caller, "a replacement may only narrow the scope", **fields
            )
        chain = (*old.workload_chain, me)
        if len(chain) > self.max_act_depth + 1:
            raise self._deny("MintTransactionToken", caller, "replaced too many times", **fields)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "iat": now,
            "exp": min(now + lifetime, old.expires_at),
            "aud": old.trust_domain,
            "txn": old.transaction_id,
            "sub": old.subject,
            "scope": " ".join(scope),
            "req_wl": me,
            "req_wl_chain": list(chain),
            "tctx": dict(old.context),
            "rctx": dict(old.request_context),
            "jti": tokens.new_token_id(),
        }
        if old.session_id:
            claims["sid"] = old.session_id
        return claims

    def _context(self, name: str, text: str) -> dict[str, Any]:
        """A request's JSON object field, checked and size-capped ({} when empty)."""
        if not text:
            return {}
        if len(text) > validation.MAX_TOKEN:
            raise BadRequest(f"{name} is longer than {validation.MAX_TOKEN} characters")
        try:
            value = strict_json_object(text.encode("utf-8"))
        except (ValueError, UnicodeEncodeError):
            raise BadRequest(f"{name} must be a JSON object") from None
        compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if len(compact.encode("utf-8")) > self.max_context:
            raise BadRequest(f"{name} exceeds {self.max_context} bytes (--max-txn-context-bytes)")
        return value


def _nested_act(actors: Iterable[str]) -> dict[str, Any] | None:
    """RFC 8693 4.1: ``{"sub": current, "act": {"sub": previous, ...}}``."""
    act: dict[str, Any] | None = None
    for actor in reversed(tuple(actors)):
        act = {"sub": actor} if act is None else {"sub": actor, "act": act}
    return act
