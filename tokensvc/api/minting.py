"""What the RPC groups share about tokens: minting access tokens and answering with a pair
(:class:`Minter`), and verifying presented ones -- access tokens and Transaction Tokens --
against the key ring (:class:`Verification`).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc.aio

from tokensvc.api import validation
from tokensvc.api.admission import current_caller
from tokensvc.api.ports import Clock
from tokensvc.api.times import ts
from tokensvc.config import Settings
from tokensvc.errors import KeyUnavailable
from tokensvc.families import tokens
from tokensvc.keys.ring import KeyRing, SigningUnavailable
from tokensvc_client.errors import InvalidToken, Reason
from tokensvc_client.peer import holds_bound_certificate
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import (
    TOKEN_TYPE,
    Claims,
    TransactionClaims,
    TransactionVerifier,
    Verifier,
)
from tokensvc_client.wire import GRACE_HEADER

log = logging.getLogger("tokensvc.service")


class Minter:
    """Signs access tokens with the ring's active key and builds token pairs."""

    def __init__(self, settings: Settings, keyring: KeyRing) -> None:
        self.issuer = settings.issuer
        self.access_ttl = settings.access_ttl
        self.keyring = keyring
        # with a window, every Refresh/Issue/GetKeys answer announces it: clients retry a
        # Refresh whose reply was lost only when the server will answer it idempotently
        # (strict mode sends nothing: no header means strict)
        grace = settings.refresh_grace_seconds
        self._grace_md = ((GRACE_HEADER, str(grace)),) if grace else ()

    def announce_grace(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Announce the grace window in the answer's trailing metadata (if there is one)."""
        if self._grace_md:
            context.set_trailing_metadata(self._grace_md)

    def claims(
        self, base: dict[str, Any], sid: str, now: int, family_expires_ms: int
    ) -> dict[str, Any]:
        """An access token's claims; it never outlives its family. ``now``: Redis's clock
        (the subject watermark's), so a replica's skewed clock cannot date it."""
        return {
            "iss": self.issuer,
            **base,
            "exp": min(now + self.access_ttl, family_expires_ms // 1000),
            "iat": now,
            "nbf": now,
            "jti": tokens.new_token_id(),
            "sid": sid,
        }

    async def mint(
        self, base: dict[str, Any], sid: str, now: int, family_expires_ms: int
    ) -> tuple[str, int]:
        """Sign an access token (see :meth:`claims`) with the active key, wherever it lives
        (this process or a PKCS#11 token); returns it and its expiry.

        Raises:
            KeyUnavailable: the key's token cannot sign now (never signed another way).
        """
        claims = self.claims(base, sid, now, family_expires_ms)
        return await self.sign(claims), claims["exp"]

    async def sign(self, claims: dict[str, Any], typ: str = TOKEN_TYPE) -> str:
        """Sign complete ``claims`` (an exchanged access token, or a Transaction Token with
        its ``typ``) with the active key.

        Raises:
            KeyUnavailable: the key's token cannot sign now (never signed another way).
        """
        try:
            return await self.keyring.sign_token(claims, typ)
        except SigningUnavailable as err:  # the pool and health log each change of state
            log.debug("signing key unavailable sid=%s: %s", claims.get("sid", ""), err)
            raise KeyUnavailable() from None

    def ready(self) -> None:
        """Refuse before anything changes in Redis when the signing key's token is known to
        be down (an HSM outage burns no refresh token and writes no family).

        Raises:
            KeyUnavailable: see :meth:`tokensvc.keys.ring.KeyRing.check_signing`.
        """
        try:
            self.keyring.check_signing()
        except SigningUnavailable as err:
            log.debug("signing key unavailable: %s", err)
            raise KeyUnavailable() from None

    @staticmethod
    def pair(
        access: str, access_exp: int, refresh: str, refresh_exp_ms: int, sid: str
    ) -> pb.TokenPair:
        return pb.TokenPair(
            access_token=access,
            refresh_token=refresh,
            token_type="Bearer",
            access_expires_at=ts(access_exp),
            refresh_expires_at=ts(refresh_exp_ms / 1000),
            session_id=sid,
        )


class Verification:
    """Verifies presented access tokens with the ring's public keys.

    ``verify`` accepts any audience (Introspect, Revoke); ``verify_own`` only tokens whose
    ``aud`` names tokensvc itself (``--self-audience``: ListSessions' self-service path).
    """

    def __init__(self, settings: Settings, keyring: KeyRing, clock: Clock) -> None:
        self.keyring = keyring
        self._any = Verifier(
            settings.issuer,
            None,
            leeway=settings.leeway,
            max_token_bytes=validation.MAX_TOKEN,
            clock=clock,
        )
        self._own = Verifier(
            settings.issuer,
            settings.self_audience,
            leeway=settings.leeway,
            max_token_bytes=validation.MAX_TOKEN,
            clock=clock,
        )
        self._transactions = TransactionVerifier(
            settings.trust_domain,
            issuer=settings.issuer,
            leeway=settings.leeway,
            max_token_bytes=validation.MAX_TOKEN,
            clock=clock,
        )

    async def verify(self, token: str) -> Claims:
        """Claims of a valid token of any audience.

        Raises:
            InvalidToken: the token is not acceptable.
        """
        return await self._verify(token, self._any)

    async def verify_own(self, token: str) -> Claims:
        """Claims of a valid token for tokensvc itself (see the class doc).

        Raises:
            InvalidToken: the token is not acceptable.
        """
        return await self._verify(token, self._own)

    async def verify_transaction(self, token: str) -> TransactionClaims:
        """Claims of a valid Transaction Token of this trust domain.

        Raises:
            InvalidToken: the token is not acceptable (an access token: ``bad_type``).
        """
        try:
            return self._transactions.verify(token, self.keyring.public)
        except InvalidToken as err:
            if err.reason is not Reason.UNKNOWN_KEY or not await self.keyring.reload_if_stale():
                raise
        return self._transactions.verify(token, self.keyring.public)

    async def _verify(self, token: str, verifier: Verifier) -> Claims:
        """Verify, reloading the ring once on an unknown kid."""
        try:
            return verifier.verify(token, self.keyring.public)
        except InvalidToken as err:
            if err.reason is not Reason.UNKNOWN_KEY or not await self.keyring.reload_if_stale():
                raise
        return verifier.verify(token, self.keyring.public)


def holds(bound: str) -> bool:
    """Whether the caller presents the certificate ``bound`` names (true if unbound)."""
    return not bound or holds_bound_certificate(bound, current_caller().peer.thumbprint)
