"""Request building and response parsing for every TokenService RPC, written once.

Each function returns a :class:`Call`: the stub method to invoke, the request message and
the parser of its response. :class:`~tokensvc_client.client.TokenClient` and
:class:`~tokensvc_client.aio.AsyncTokenClient` differ only in how they invoke a call
(blocking or awaited), so the two cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tokensvc_client.errors import RpcFailed
from tokensvc_client.results import (
    ExchangedToken,
    Introspection,
    Jwks,
    SessionInfo,
    TokenPair,
    TransactionToken,
)
from tokensvc_client.v1 import tokensvc_pb2 as pb

Resp = TypeVar("Resp", bound=Message)
Result = TypeVar("Result")
Method = Literal[
    "Issue",
    "Refresh",
    "Revoke",
    "Introspect",
    "GetKeys",
    "LockSubject",
    "UnlockSubject",
    "ListSessions",
    "Exchange",
    "MintTransactionToken",
]
#: RFC 8693 / draft-ietf-oauth-transaction-tokens-10 subject token types
TXN_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:txn_token"
WORKLOAD_TOKEN_TYPE = "urn:tokensvc:params:oauth:token-type:workload"
#: Call metadata (gRPC headers) of one call.
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Call(Generic[Resp, Result]):
    """One RPC ready to send: ``getattr(stub, method)(request, metadata=metadata)``, then
    ``parse``."""

    method: Method
    request: Message
    parse: Callable[[Resp], Result]
    metadata: Metadata = ()


def check_timeout(timeout: float) -> float:
    """Validate a client's per-call deadline (seconds).

    Raises:
        ValueError: not a positive number.
    """
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return float(timeout)


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _optional_seconds(message: Message, name: str) -> float | None:
    return _seconds(getattr(message, name)) if message.HasField(name) else None


def _pair(message: pb.TokenPair) -> TokenPair:
    return TokenPair(
        access_token=message.access_token,
        refresh_token=message.refresh_token,
        token_type=message.token_type,
        access_expires_at=_seconds(message.access_expires_at),
        refresh_expires_at=_seconds(message.refresh_expires_at),
        session_id=message.session_id,
    )


def _tokens_of(response: pb.IssueResponse | pb.RefreshResponse) -> TokenPair:
    if not response.HasField("tokens") or not response.tokens.access_token:
        raise RpcFailed("response without tokens")
    return _pair(response.tokens)


def issue(
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
) -> Call[pb.IssueResponse, TokenPair]:
    """Build an Issue call; ``auth_time`` is epoch seconds or an aware datetime."""
    request = pb.IssueRequest(
        subject=subject,
        roles=list(roles),
        audience=list(audience),
        client_id=client_id,
        acr=acr,
        amr=list(amr),
        session_label=session_label,
        bind_to_client_certificate=bind_to_client_certificate,
        cnf_x5t_s256=cnf_x5t_s256,
    )
    if auth_time is not None:
        seconds = auth_time.timestamp() if isinstance(auth_time, datetime) else auth_time
        request.auth_time.FromNanoseconds(int(seconds * 1e9))
    return Call("Issue", request, _tokens_of)


def refresh(refresh_token: str) -> Call[pb.RefreshResponse, TokenPair]:
    """Build a Refresh call."""
    return Call("Refresh", pb.RefreshRequest(refresh_token=refresh_token), _tokens_of)


def revoke(
    *,
    token: str | None = None,
    session_id: str | None = None,
    subject: str | None = None,
    reason: str = "",
) -> Call[pb.RevokeResponse, int]:
    """Build a Revoke call for exactly one target.

    Raises:
        ValueError: not exactly one of ``token``, ``session_id``, ``subject`` given.
    """
    targets = {"token": token, "session_id": session_id, "subject": subject}
    given = {name: value for name, value in targets.items() if value is not None}
    if len(given) != 1:
        raise ValueError("revoke needs exactly one of token, session_id or subject")
    request = pb.RevokeRequest(reason=reason, **given)
    return Call("Revoke", request, _revoked_sessions)


def _revoked_sessions(response: pb.RevokeResponse) -> int:
    return response.revoked_sessions


def introspect(token: str) -> Call[pb.IntrospectResponse, Introspection]:
    """Build an Introspect call."""
    return Call("Introspect", pb.IntrospectRequest(token=token), _introspection)


def _introspection(response: pb.IntrospectResponse) -> Introspection:
    if not response.active:
        return Introspection(active=False)
    return Introspection(
        active=True,
        token_type=response.token_type,
        subject=response.subject,
        roles=tuple(response.roles),
        audience=tuple(response.audience),
        issuer=response.issuer,
        client_id=response.client_id,
        session_id=response.session_id,
        token_id=response.token_id,
        acr=response.acr,
        amr=tuple(response.amr),
        issued_at=_optional_seconds(response, "issued_at"),
        expires_at=_optional_seconds(response, "expires_at"),
        not_before=_optional_seconds(response, "not_before"),
        cnf_x5t_s256=response.cnf_x5t_s256,
    )


def lock_subject(subject: str, reason: str = "") -> Call[pb.LockSubjectResponse, int]:
    """Build a LockSubject call; its result is the number of sessions revoked."""
    request = pb.LockSubjectRequest(subject=subject, reason=reason)
    return Call("LockSubject", request, _locked_sessions)


def _locked_sessions(response: pb.LockSubjectResponse) -> int:
    return response.revoked_sessions


def unlock_subject(subject: str) -> Call[pb.UnlockSubjectResponse, bool]:
    """Build an UnlockSubject call; its result says whether the subject was locked."""
    return Call("UnlockSubject", pb.UnlockSubjectRequest(subject=subject), _was_locked)


def _was_locked(response: pb.UnlockSubjectResponse) -> bool:
    return response.was_locked


def get_keys() -> Call[pb.GetKeysResponse, Jwks]:
    """Build a GetKeys call."""
    return Call("GetKeys", pb.GetKeysRequest(), _jwks)


def _jwks(response: pb.GetKeysResponse) -> Jwks:
    return Jwks(jwks_json=response.jwks, max_age_seconds=response.max_age_seconds)


def list_sessions(
    subject: str, *, access_token: str | None = None
) -> Call[pb.ListSessionsResponse, list[SessionInfo]]:
    """Build a ListSessions call; with ``access_token`` (the subject's own) it carries
    ``authorization: Bearer``, which lets a caller that is not an admin identity list the
    subject's sessions (self-service)."""
    metadata: Metadata = ()
    if access_token is not None:
        metadata = (("authorization", f"Bearer {access_token}"),)
    request = pb.ListSessionsRequest(subject=subject)
    return Call("ListSessions", request, _sessions, metadata)


def _sessions(response: pb.ListSessionsResponse) -> list[SessionInfo]:
    return [
        SessionInfo(
            session_id=s.session_id,
            client_id=s.client_id,
            session_label=s.session_label,
            created_at=_seconds(s.created_at),
            last_refreshed_at=_seconds(s.last_refreshed_at),
            expires_at=_seconds(s.expires_at),
            active=s.active,
        )
        for s in response.sessions
    ]


def exchange(
    subject_token: str,
    audience: Iterable[str],
    *,
    roles: Iterable[str] = (),
    impersonate: bool = False,
) -> Call[pb.ExchangeResponse, ExchangedToken]:
    """Build an Exchange call."""
    request = pb.ExchangeRequest(
        subject_token=subject_token,
        audience=list(audience),
        roles=list(roles),
        impersonate=impersonate,
    )
    return Call("Exchange", request, _exchanged)


def _exchanged(response: pb.ExchangeResponse) -> ExchangedToken:
    return ExchangedToken(
        access_token=response.access_token,
        expires_at=_seconds(response.expires_at),
        session_id=response.session_id,
        roles=tuple(response.roles),
    )


def mint_transaction_token(
    subject_token: str | None,
    scope: Iterable[str],
    *,
    replace: bool = False,
    request_details: dict[str, object] | None = None,
    request_context: dict[str, object] | None = None,
    lifetime_seconds: int = 0,
) -> Call[pb.MintTransactionTokenResponse, TransactionToken]:
    """Build a MintTransactionToken call: from an access token, a replacement of a
    Transaction Token (``replace``), or for the calling workload itself (no token)."""
    if replace and not subject_token:
        raise ValueError("a replacement needs the Transaction Token to replace")
    # the calling workload acting on its own; a replacement; "" (an access token, the default)
    kind = WORKLOAD_TOKEN_TYPE if subject_token is None else (TXN_TOKEN_TYPE if replace else "")
    request = pb.MintTransactionTokenRequest(
        subject_token=subject_token or "",
        subject_token_type=kind,
        scope=list(scope),
        request_details=_json(request_details),
        request_context=_json(request_context),
        lifetime_seconds=lifetime_seconds,
    )
    return Call("MintTransactionToken", request, _transaction_token)


def _json(value: dict[str, object] | None) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"))


def _transaction_token(response: pb.MintTransactionTokenResponse) -> TransactionToken:
    return TransactionToken(
        txn_token=response.txn_token,
        expires_at=_seconds(response.expires_at),
        txn=response.txn,
    )
