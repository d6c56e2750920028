"""The claims of a verified token, type-checked: :class:`Claims` of an access token and
:class:`TransactionClaims` of a Transaction Token (draft-ietf-oauth-transaction-tokens-10;
docs/call-chains.md), each built by a ``*_from_dict`` function that checks every claim's
type (no time, issuer or audience checks: those are the verifiers').

Private: import these names from :mod:`tokensvc_client.verifier`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from tokensvc_client.errors import InvalidToken, Reason

#: How deep a verifier follows nested ``act`` claims before calling the token malformed
#: (the service mints far fewer: ``--max-act-depth``).
MAX_ACT_NESTING: Final = 16
# Exclusive bound: 10000-01-01T00:00:00Z, the first instant a protobuf Timestamp cannot hold.
_MAX_NUMERIC_DATE: Final = 253_402_300_800


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of an access token."""

    issuer: str
    subject: str
    audience: tuple[str, ...]
    expires_at: int
    issued_at: int
    not_before: int
    token_id: str
    session_id: str
    client_id: str
    roles: tuple[str, ...]
    acr: str = ""
    amr: tuple[str, ...] = ()
    auth_time: int | None = None
    cnf_x5t_s256: str = ""
    #: The ``kid`` of the key that signed the token (its JOSE header); empty when the
    #: claims did not come from a verified token (e.g. :func:`claims_from_dict` alone).
    key_id: str = ""
    #: The actor chain of an exchanged token (RFC 8693 ``act``): the workload that made
    #: the last exchange first, then the earlier ones; empty for a token never exchanged
    #: (or exchanged by impersonation).
    actors: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _str(claims: Mapping[str, Any], name: str, *, required: bool, nonempty: bool = False) -> str:
    value = claims.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (nonempty and not value):
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be a string")
    return value


def _str_list(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be a list of strings")
    return tuple(value)


def _date(claims: Mapping[str, Any], name: str) -> int:
    """A required NumericDate: an integer (not a bool, not a float), 0 <= v < 2**53."""
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_NUMERIC_DATE:
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be an integer NumericDate")
    return value


def _optional_date(claims: Mapping[str, Any], name: str) -> int | None:
    return None if claims.get(name) is None else _date(claims, name)


def actor_chain(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``sub`` of each nested ``act`` (RFC 8693 4.1), outermost (current actor) first.

    Raises:
        InvalidToken: ``BAD_CLAIMS`` for an ``act`` that is not an object with a string
            ``sub``, or nested deeper than :data:`MAX_ACT_NESTING`.
    """
    actors: list[str] = []
    act = claims.get("act")
    while act is not None:
        if len(actors) >= MAX_ACT_NESTING:
            raise InvalidToken(Reason.BAD_CLAIMS, "act nested too deep")
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise InvalidToken(Reason.BAD_CLAIMS, "act must be an object with a sub")
        actors.append(act["sub"])
        act = act.get("act")
    return tuple(actors)


def claims_from_dict(claims: Mapping[str, Any], *, key_id: str = "") -> Claims:
    """Type-check a claims object into :class:`Claims` (no time or issuer checks);
    ``key_id`` is the signing key's ``kid``, from the token's header."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        audience: tuple[str, ...] = (aud,)
    else:
        audience = _str_list(claims, "aud")
    if not audience:
        raise InvalidToken(Reason.BAD_CLAIMS, "aud missing")
    cnf = claims.get("cnf")
    thumbprint = ""
    if cnf is not None:
        if not isinstance(cnf, dict) or not isinstance(cnf.get("x5t#S256"), str):
            raise InvalidToken(Reason.BAD_CLAIMS, "cnf must hold x5t#S256")
        thumbprint = cnf["x5t#S256"]
    return Claims(
        issuer=_str(claims, "iss", required=True),
        subject=_str(claims, "sub", required=True, nonempty=True),
        audience=audience,
        expires_at=_date(claims, "exp"),
        issued_at=_date(claims, "iat"),
        not_before=_date(claims, "nbf"),
        token_id=_str(claims, "jti", required=True, nonempty=True),
        session_id=_str(claims, "sid", required=True, nonempty=True),
        client_id=_str(claims, "client_id", required=False),
        roles=_str_list(claims, "roles"),
        acr=_str(claims, "acr", required=False),
        amr=_str_list(claims, "amr"),
        auth_time=_optional_date(claims, "auth_time"),
        cnf_x5t_s256=thumbprint,
        key_id=key_id,
        actors=actor_chain(claims),
        raw=claims,
    )


# -- Transaction Tokens (draft-ietf-oauth-transaction-tokens-10) ----------------------------


@dataclass(frozen=True, slots=True)
class TransactionClaims:
    """The verified claims of a Transaction Token (draft-ietf-oauth-transaction-tokens-10,
    section "Txn-Token Format"; docs/call-chains.md)."""

    #: ``aud``: the trust domain the token is valid in
    trust_domain: str
    #: ``txn``: the transaction's id, the same in every replacement
    transaction_id: str
    #: ``sub``: the principal of the transaction (a user, or a workload acting on its own)
    subject: str
    #: ``scope`` (space-delimited in the token): the purpose of the transaction
    scope: tuple[str, ...]
    #: ``req_wl``: the workload that requested this token (its mTLS identity)
    requesting_workload: str
    issued_at: int
    expires_at: int
    #: ``req_wl_chain`` (tokensvc): every workload that requested the token or one it
    #: replaces, the edge first, ``requesting_workload`` last (the draft asks a replacement
    #: to keep this call chain and leaves the mechanism open)
    workload_chain: tuple[str, ...] = ()
    #: ``tctx``: the immutable transaction context
    context: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: ``rctx``: the request context (e.g. ``req_ip``)
    request_context: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: ``sid`` (tokensvc): the session of the subject token ("" for a workload's own
    #: transaction): revoking the session ends the transaction's tokens
    session_id: str = ""
    #: ``jti`` (tokensvc): this token's id
    token_id: str = ""
    issuer: str = ""
    key_id: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def for_revocation(self) -> Claims:
        """The token as a revocation check sees an access token (session, jti, subject,
        issue time, signing key): one revocation source serves both kinds."""
        return Claims(
            issuer=self.issuer,
            subject=self.subject,
            audience=(self.trust_domain,),
            expires_at=self.expires_at,
            issued_at=self.issued_at,
            not_before=self.issued_at,
            token_id=self.token_id or self.transaction_id,
            session_id=self.session_id,
            client_id="",
            roles=self.scope,
            key_id=self.key_id,
        )


def _object(claims: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = claims.get(name, {})
    if not isinstance(value, dict):
        raise InvalidToken(Reason.BAD_CLAIMS, f"{name} must be a JSON object")
    return value


def transaction_claims_from_dict(
    claims: Mapping[str, Any], *, key_id: str = ""
) -> TransactionClaims:
    """Type-check a Transaction Token's claims (no time or audience checks): every claim
    the draft requires (``iat``, ``aud``, ``exp``, ``txn``, ``sub``, ``scope``,
    ``req_wl``) present and of its type; ``tctx``/``rctx`` objects when present."""
    aud = claims.get("aud")
    audience = (aud,) if isinstance(aud, str) else _str_list(claims, "aud")
    if len(audience) != 1 or not audience[0]:
        raise InvalidToken(Reason.BAD_CLAIMS, "aud must name one trust domain")
    scope = _str(claims, "scope", required=True, nonempty=True)
    chain = _str_list(claims, "req_wl_chain")
    requester = _str(claims, "req_wl", required=True, nonempty=True)
    if chain and chain[-1] != requester:
        raise InvalidToken(Reason.BAD_CLAIMS, "req_wl_chain must end with req_wl")
    return TransactionClaims(
        trust_domain=audience[0],
        transaction_id=_str(claims, "txn", required=True, nonempty=True),
        subject=_str(claims, "sub", required=True, nonempty=True),
        scope=tuple(scope.split()),
        requesting_workload=requester,
        issued_at=_date(claims, "iat"),
        expires_at=_date(claims, "exp"),
        workload_chain=chain or (requester,),
        context=_object(claims, "tctx"),
        request_context=_object(claims, "rctx"),
        session_id=_str(claims, "sid", required=False),
        token_id=_str(claims, "jti", required=False),
        issuer=_str(claims, "iss", required=False),
        key_id=key_id,
        raw=claims,
    )
