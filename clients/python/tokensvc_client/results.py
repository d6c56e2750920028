"""Typed results of TokenService calls, shared by the sync and asyncio clients.

Times are UNIX epoch seconds as ``float`` -- the scale of ``time.time()`` and of
:class:`~tokensvc_client.verifier.Claims` -- so expiry arithmetic needs no conversion.
Token strings are left out of ``repr`` so a result that ends up in a log line or a
traceback does not leak a credential.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokensvc_client.verifier import KeySet


@dataclass(frozen=True, slots=True)
class TokenPair:
    """An access token and the refresh token that rotates it (one session).

    Attributes:
        access_token: compact JWS to send as ``authorization: Bearer <access_token>``.
        refresh_token: opaque; spend it once with ``refresh``, then keep the successor.
        token_type: always ``"Bearer"``.
        access_expires_at: epoch seconds after which the access token is rejected.
        refresh_expires_at: epoch seconds after which the refresh token is rejected.
        session_id: the refresh family; stays the same across refreshes.
    """

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_type: str
    access_expires_at: float
    refresh_expires_at: float
    session_id: str


@dataclass(frozen=True, slots=True)
class Introspection:
    """What the service says about a token (RFC 7662 style).

    An inactive token carries no other information: every field but ``active`` is empty,
    whatever the reason (expired, revoked, forged, unknown) -- the service does not tell.

    Attributes:
        active: the token is currently valid.
        token_type: ``"access"`` or ``"refresh"``.
        issued_at / expires_at / not_before: epoch seconds, ``None`` when not reported.
        cnf_x5t_s256: thumbprint of the client certificate the token is bound to
            (RFC 8705 ``x5t#S256``); ``""`` for an unbound token.
    """

    active: bool
    token_type: str = ""
    subject: str = ""
    roles: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    issuer: str = ""
    client_id: str = ""
    session_id: str = ""
    token_id: str = ""
    acr: str = ""
    amr: tuple[str, ...] = ()
    issued_at: float | None = None
    expires_at: float | None = None
    not_before: float | None = None
    cnf_x5t_s256: str = ""


@dataclass(frozen=True, slots=True)
class Jwks:
    """The service's public keys and how long a verifier may cache them.

    Attributes:
        jwks_json: RFC 7517 JWK Set document (public keys only).
        max_age_seconds: cache lifetime the service allows.
    """

    jwks_json: str
    max_age_seconds: int

    def key_set(self) -> KeySet:
        """Parse into a :class:`KeySet`.

        Raises:
            KeysUnavailable: the document is not a usable JWK Set.
        """
        return KeySet.from_jwks(self.jwks_json)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session (refresh family) of a subject, as ListSessions reports it.

    Attributes:
        session_id: the family id (the ``sid`` of its access tokens).
        client_id: the client it was issued to.
        session_label: the device label given at Issue (e.g. "Firefox on laptop").
        created_at / last_refreshed_at / expires_at: epoch seconds; ``expires_at`` is the
            absolute end of the session.
        active: not revoked and not expired.
    """

    session_id: str
    client_id: str
    session_label: str
    created_at: float
    last_refreshed_at: float
    expires_at: float
    active: bool


@dataclass(frozen=True, slots=True)
class ExchangedToken:
    """An access token for another audience (RFC 8693 token exchange).

    Attributes:
        access_token: send it as ``authorization: Bearer <access_token>`` to that audience.
        expires_at: epoch seconds; never later than the subject token's.
        session_id: the subject token's session (revoking it revokes this token).
        roles: the roles granted (a subset of the subject token's).
    """

    access_token: str = field(repr=False)
    expires_at: float
    session_id: str
    roles: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TransactionToken:
    """A Transaction Token (draft-ietf-oauth-transaction-tokens-10).

    Attributes:
        txn_token: send it as ``txn-token`` metadata (never as an access token).
        expires_at: epoch seconds.
        txn: the transaction id, the same for every replacement.
    """

    txn_token: str = field(repr=False)
    expires_at: float
    txn: str
