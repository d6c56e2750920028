"""The server package's exceptions: one root, small families below it, a stable code each.

Every exception tokensvc raises on purpose is a :class:`TokensvcError`; its ``code`` is a
stable, machine-readable string (like joserfc's ``error = "invalid_claim"``) that logs,
the audit trail and tests may rely on -- the message is for people and may change::

    TokensvcError                      error
    ├── ConfigError (ValueError)       invalid_configuration   (TlsFilesError ...)
    ├── StoreUnavailable               store_unavailable       tokensvc.store.calls
    ├── KeyRingError                   key_ring                tokensvc.keys.backend
    │   └── SigningUnavailable         signing_unavailable
    ├── StartupError                   startup                 tokensvc.proc.ownership
    ├── TransportError (ValueError)    transport               tokensvc.cli.transport
    └── ServiceError                   service                 an RPC's refusal
        ├── BadRequest                 bad_request
        ├── NotAuthenticated           not_authenticated       + reason: AuthFailure
        ├── Denied                     denied                  + reason: Denial
        │   └── SubjectLocked          subject_locked
        ├── KeyUnavailable             key_unavailable         the signing key's token is down
        └── RateLimited                rate_limited            + limit: LimitKind

The classes of the middle families live beside the code that raises them (each module
names its own failure); this module holds the root, the configuration family every layer
checks, and the refusals of the gRPC surface with their reasons. The reasons are values:
the failed-authentication limits, the audit trail and the metrics read them, never the
message. :mod:`tokensvc.api.status` maps the families to gRPC status codes in one table.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class TokensvcError(Exception):
    """Root of every exception the server package raises on purpose."""

    code: ClassVar[str] = "error"


class ConfigError(TokensvcError, ValueError):
    """An invalid configuration value; the message names the setting.

    In a module of its own floor: every module that checks part of the configuration
    (config, redis.connection, security.tls, security.policy, http) raises it without
    importing the others.
    """

    code = "invalid_configuration"


# -- refusals of an RPC -------------------------------------------------------------------


class AuthFailure(enum.StrEnum):
    """Why a presented credential was not accepted (the UNAUTHENTICATED message is the
    value). The verifier's own reasons (:class:`tokensvc_client.errors.Reason`) map onto
    members of the same value; the server adds the refresh-family outcomes."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    REFRESH_AS_ACCESS = "refresh_token_as_access_token"
    BAD_HEADER = "bad_header"
    BAD_ALGORITHM = "bad_algorithm"
    BAD_TYPE = "bad_type"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    BAD_CLAIMS = "bad_claims"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING = "missing_token"
    UNBOUND = "unbound"
    INSUFFICIENT_ROLE = "insufficient_role"
    INSUFFICIENT_USER_AUTHENTICATION = "insufficient_user_authentication"
    ACTOR_CHAIN = "actor_chain"
    #: a refresh token the service did not make (bad MAC), or a family it does not know
    UNKNOWN = "unknown"
    #: bound (RFC 8705) to another certificate than the presenting peer's
    CERTIFICATE_MISMATCH = "certificate_mismatch"
    EXPIRED = "expired"
    REVOKED = "revoked"
    #: a rotated refresh token presented again: its family is revoked
    REUSED = "reused"

    @property
    def is_guess(self) -> bool:
        """Whether it may be someone guessing (counted by the failed-authentication limits);
        an expired, revoked or reused credential is normal life (audited, not counted)."""
        return self not in _NORMAL_LIFE


_NORMAL_LIFE = frozenset({AuthFailure.EXPIRED, AuthFailure.REVOKED, AuthFailure.REUSED})


class Denial(enum.StrEnum):
    """Why an identified call was refused (PERMISSION_DENIED)."""

    #: the caller policy does not admit this caller to this RPC
    POLICY = "policy"
    #: ListSessions by a caller neither admitted nor carrying the subject's own token
    NO_CREDENTIAL = "no_credential"
    #: ListSessions with a valid token of another subject
    OTHER_SUBJECT = "other_subject"
    #: Issue for a locked subject: the subject's state, not the caller's failure
    SUBJECT_LOCKED = "subject_locked"
    #: Exchange or MintTransactionToken beyond what the exchange policy or the narrowing
    #: rules allow (the handler audits it as ``exchange_denied``)
    EXCHANGE = "exchange_policy"

    @property
    def is_callers(self) -> bool:
        """Whether the caller failed (audited and counted by the admission guard)."""
        return self not in (Denial.SUBJECT_LOCKED, Denial.EXCHANGE)


class LimitKind(enum.StrEnum):
    """Which rate limit refused a call (the audit record's ``reason`` is the value)."""

    ISSUE = "Issue"
    REFRESH_PER_PEER = "Refresh per peer"
    INTROSPECT_PER_PEER = "Introspect per peer"
    FAILURES_PER_PEER = "failed authentications per peer"
    FAILURES_PER_SESSION = "failed authentications per session"

    @classmethod
    def per_peer(cls, rpc: str) -> LimitKind:
        """The per-peer limit of ``rpc`` (Refresh or Introspect)."""
        return cls(f"{rpc} per peer")


class ServiceError(TokensvcError):
    """Root of the refusals an RPC handler raises on purpose; ``message`` is what the
    caller reads (stable: clients and tests match on it)."""

    code = "service"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    """A request field is missing, too long or inconsistent; the message names it."""

    code = "bad_request"


class NotAuthenticated(ServiceError):
    """The presented credential is not accepted; the message is the reason's value."""

    code = "not_authenticated"

    def __init__(self, reason: AuthFailure) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Denied(ServiceError):
    """The caller may not do this (caller policy, another subject, a locked subject)."""

    code = "denied"

    def __init__(self, reason: Denial, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SubjectLocked(Denied):
    """Issue for a locked subject (not a failed authentication of the caller)."""

    code = "subject_locked"

    def __init__(self) -> None:
        super().__init__(Denial.SUBJECT_LOCKED, "subject is locked")


class KeyUnavailable(ServiceError):
    """The signing key's holder (a PKCS#11 token) cannot sign now: nothing was signed or
    written; the caller may retry (UNAVAILABLE)."""

    code = "key_unavailable"

    def __init__(self) -> None:
        super().__init__("signing key unavailable; retry later")


class RateLimited(ServiceError):
    """Over a rate limit; ``retry_after`` (whole seconds, at least 1) goes into the
    ``retry-after`` trailer."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_ms: int, limit: LimitKind | None = None) -> None:
        super().__init__(message)
        self.limit = limit  # None: a cap of another kind (e.g. streams per client)
        self.retry_after = max(1, -(-retry_after_ms // 1000))
