"""The web backend's side of tokensvc: start, check, refresh and end browser sessions.

:class:`WebBackend` is what an ASGI app configures once and hands to
:class:`~tokensvc_client.web.middleware.TokenSessionMiddleware` and the devices routes.
It talks to tokensvc with an :class:`~tokensvc_client.AsyncTokenClient` (Issue, Refresh,
Revoke, ListSessions) and verifies access tokens locally with the interceptors' own
decision code (:class:`tokensvc_client._auth.Authenticator`: the same
:class:`~tokensvc_client.verifier.Verifier`, the same
:class:`~tokensvc_client.jwks.AsyncJwksCache`, the same optional revocation check such as
a :class:`~tokensvc_client.RevocationFeed`, whose own thread suits any event loop).

gRPC asyncio channels, asyncio locks and futures belong to one event loop; the backend
opens its connection lazily in the loop that serves requests (and anew if that loop
changes, as in tests that start several), so it can be built at import time.

**A session ended elsewhere.** Without a revocation check the backend learns that a
session was revoked elsewhere ("sign out everywhere" in another browser, an operator) only
when tokensvc refuses it: at the next refresh, or when a call made for the session
(ListSessions with its token, a Revoke) is answered UNAUTHENTICATED or PERMISSION_DENIED.
Such an answer ends the browser session like a refused refresh: the cookie is cleared and
:class:`~tokensvc_client.web.context.NoSession` raised (the middleware answers 401 or
redirects to ``login_url``); a logout simply completes.

**ListSessions and its audience.** The devices page lists the user's sessions with the
user's *own* access token (ListSessions' self-service path): the web backend needs no
admin identity, and can list no one else's sessions. tokensvc requires that token's
``aud`` to name tokensvc itself (its ``--self-audience``, default ``tokensvc``): add that
audience to ``extra_audience``, and every token the backend issues carries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from tokensvc_client._auth import Authenticator, RevocationCheck, step
from tokensvc_client._rejection import Rejection
from tokensvc_client.aio import AsyncTokenClient
from tokensvc_client.channels import Pem
from tokensvc_client.errors import (
    InvalidArgument,
    PermissionDenied,
    TokenServiceError,
    Unauthenticated,
)
from tokensvc_client.jwks import AsyncJwksCache, KeyRequest
from tokensvc_client.results import SessionInfo
from tokensvc_client.verifier import DEFAULT_LEEWAY_SECONDS, Claims, Verifier
from tokensvc_client.web.context import NoSession, RequestState, WebSession, request_state
from tokensvc_client.web.cookies import CookieJar, CookieRefusal
from tokensvc_client.web.csrf import CsrfRefusal
from tokensvc_client.web.refresh import Refresher, StoredSession
from tokensvc_client.web.settings import WebSettings

__all__ = ["Resolution", "WebBackend"]

log = logging.getLogger("tokensvc_client.web")

#: Refresh failures that end the session (revoked, reused, expired, refused).
_ENDED = (Unauthenticated, InvalidArgument, PermissionDenied)
#: Answers to a call made for a session that end it (revoked elsewhere, refused).
_REFUSED = (Unauthenticated, PermissionDenied)


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a request's session cookie amounts to.

    Attributes:
        session: the verified session, or ``None``.
        store: a newer session to write into the cookie (after a refresh).
        ended: the session is over: clear its cookie.
        unavailable: tokensvc or its keys cannot be reached; the session may be fine.
    """

    session: WebSession | None = None
    store: StoredSession | None = None
    ended: bool = False
    unavailable: bool = False


@dataclass
class _Connection:
    loop: asyncio.AbstractEventLoop
    client: AsyncTokenClient
    keys: AsyncJwksCache
    refresher: Refresher


class WebBackend:
    """Browser sessions backed by tokensvc.

    Args:
        settings: see :class:`~tokensvc_client.web.settings.WebSettings`.
        target: tokensvc's "host:port".
        ca, cert, key, insecure: TLS to tokensvc, as for
            :class:`~tokensvc_client.AsyncTokenClient` (the backend's client certificate
            is the identity the caller policy must allow for Issue and Revoke).
        revocation_check: optional, as for the interceptors (e.g. a started
            ``RevocationFeed``): a revoked session is then refused at once, not at its
            next refresh.
        audit: called with every CSRF refusal and every refused cookie (tampered,
            truncated, another key's, malformed, sent twice), after it is logged; the
            records hold no cookie value.
        leeway: clock skew tolerated for ``nbf``/``iat``.
        clock: epoch seconds; injectable for tests.
        timeout: deadline of each call to tokensvc.
    """

    def __init__(
        self,
        settings: WebSettings,
        *,
        target: str,
        ca: Pem | None = None,
        cert: Pem | None = None,
        key: Pem | None = None,
        insecure: bool = False,
        revocation_check: RevocationCheck | None = None,
        audit: Callable[[CsrfRefusal | CookieRefusal], None] | None = None,
        leeway: int = DEFAULT_LEEWAY_SECONDS,
        clock: Callable[[], float] = time.time,
        timeout: float = 5.0,
    ) -> None:
        self.settings = settings.validate()
        self.cookies = CookieJar(settings)
        self.audit = audit
        self._clock = clock
        self._connect: Callable[[], AsyncTokenClient] = lambda: AsyncTokenClient(
            target, ca=ca, cert=cert, key=key, insecure=insecure, timeout=timeout
        )
        self._auth = Authenticator(
            Verifier(settings.issuer, settings.audience, leeway=leeway, clock=clock),
            exempt=(),
            revocation_check=revocation_check,
        )
        self._conn: _Connection | None = None

    def now(self) -> float:
        return self._clock()

    def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.loop is not loop:
            client = self._connect()
            conn = _Connection(
                loop,
                client,
                AsyncJwksCache(client.get_keys),
                Refresher(
                    client.refresh,
                    margin=self.settings.refresh_margin,
                    memory=self.settings.spent_token_memory,
                    clock=self._clock,
                ),
            )
            self._conn = conn
        return conn

    async def aclose(self) -> None:
        """Close the connection to tokensvc (an app's shutdown/lifespan hook)."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.loop is asyncio.get_running_loop():
            await conn.client.close()

    # -- every request -----------------------------------------------------------------

    async def resolve(self, stored: StoredSession, where: str) -> Resolution:
        """Verify the cookie's session, refreshing it (once per session) when due or when
        its token is refused; ``where`` names the request in logs."""
        conn = self._connection()
        newest = conn.refresher.newest(stored)
        replaced = newest is not stored
        if not newest.due(self._clock()):
            outcome = await self._verify(conn, newest.tokens.access_token, where)
            if isinstance(outcome, Claims):
                return Resolution(WebSession(outcome, newest.tokens), newest if replaced else None)
            if outcome.code is not grpc.StatusCode.UNAUTHENTICATED:
                return Resolution(unavailable=True)
            # refused (revoked, its key withdrawn): a refresh tells whether the session lives
        try:
            fresh = await conn.refresher.refresh(newest)
        except _ENDED as err:
            log.info("session ended sid=%s: %s", newest.tokens.session_id, err)
            return Resolution(ended=True)
        except TokenServiceError as err:
            log.warning("refresh failed sid=%s: %s", newest.tokens.session_id, err)
            return await self._without_refresh(conn, newest, replaced, where)
        outcome = await self._verify(conn, fresh.tokens.access_token, where)
        if isinstance(outcome, Claims):
            return Resolution(WebSession(outcome, fresh.tokens), fresh)
        return Resolution(unavailable=outcome.code is not grpc.StatusCode.UNAUTHENTICATED)

    async def _without_refresh(
        self, conn: _Connection, stored: StoredSession, replaced: bool, where: str
    ) -> Resolution:
        """tokensvc unreachable: keep serving with the current token while it is valid."""
        outcome = await self._verify(conn, stored.tokens.access_token, where)
        if isinstance(outcome, Claims):
            return Resolution(WebSession(outcome, stored.tokens), stored if replaced else None)
        return Resolution(unavailable=True)

    async def _verify(self, conn: _Connection, token: str, where: str) -> Claims | Rejection:
        decision = self._auth.decide(where, (("authorization", f"Bearer {token}"),))
        outcome = step(decision, None)
        while isinstance(outcome, KeyRequest):
            outcome = step(decision, await conn.keys.answer(outcome))
        return outcome

    # -- what handlers call --------------------------------------------------------------

    async def start(
        self,
        subject: str,
        *,
        roles: tuple[str, ...] = (),
        session_label: str = "",
        acr: str = "",
        amr: tuple[str, ...] = (),
        auth_time: float | None = None,
    ) -> WebSession:
        """Start a session for a user the app has authenticated: Issue through tokensvc,
        and set the session cookie (and a fresh CSRF token) on this response.

        Raises:
            TokenServiceError: tokensvc refused or is unreachable (no cookie is set).
        """
        state = request_state()
        conn = self._connection()
        pair = await conn.client.issue(
            subject,
            roles=roles,
            audience=(self.settings.audience, *self.settings.extra_audience),
            client_id=self.settings.client_id,
            acr=acr,
            amr=amr,
            auth_time=auth_time,
            session_label=session_label,
        )
        now = self._clock()
        stored = StoredSession.of(pair, now, self.settings.refresh_margin)
        outcome = await self._verify(conn, pair.access_token, "session start")
        if not isinstance(outcome, Claims):
            # e.g. settings.audience not among what the tokens carry: a setup error
            await self._revoke_quietly(conn, pair.session_id, "web: unverifiable")
            raise TokenServiceError(f"issued token not accepted: {outcome.message}")
        session = WebSession(outcome, pair)
        if state.session is not None:  # a new login in this browser: end the one it replaces
            await self._revoke_quietly(conn, state.session.session_id, "web: replaced")
        state.session = session
        state.cookie(self.cookies.set_session(stored, now))
        self._new_csrf(state)
        log.info("session started sid=%s", pair.session_id)
        return session

    @staticmethod
    async def _revoke_quietly(conn: _Connection, session_id: str, reason: str) -> None:
        try:
            await conn.client.revoke(session_id=session_id, reason=reason)
        except TokenServiceError as err:
            log.warning("could not revoke sid=%s: %s", session_id, err)

    async def logout(self) -> None:
        """End this session: Revoke it at tokensvc, clear the cookie."""
        state = request_state()
        if state.session is not None:
            sid = state.session.session_id
            try:
                await self._connection().client.revoke(session_id=sid, reason="web: logout")
            except _REFUSED as err:  # over already, or not ours to end: signed out here
                log.info("logout refused by tokensvc sid=%s: %s", sid, err.code.name)
            else:
                log.info("logged out sid=%s", sid)
        self.end(state)

    async def logout_everywhere(self) -> int:
        """End every session of this user ("sign out everywhere"); clear the cookie.

        Returns:
            The number of sessions revoked.

        Raises:
            NoSession: an anonymous request, or tokensvc refused the session (ended
                elsewhere): its cookie is cleared.
        """
        state = request_state()
        if state.session is None:
            raise NoSession("no session")
        subject = state.session.claims.subject
        try:
            count = await self._connection().client.revoke(
                subject=subject, reason="web: sign out everywhere"
            )
        except _REFUSED as err:
            raise self._refused(state, err) from err
        log.info("signed out everywhere sid=%s sessions=%d", state.session.session_id, count)
        self.end(state)
        return count

    async def sessions(self) -> list[SessionInfo]:
        """This user's sessions (ListSessions with the user's own access token).

        Raises:
            NoSession: an anonymous request, or tokensvc refused the session's token
                (revoked elsewhere, while still valid here): its cookie is cleared.
        """
        state = request_state()
        session = state.session
        if session is None:
            raise NoSession("no session")
        try:
            return await self._connection().client.list_sessions(
                session.claims.subject, access_token=session.tokens.access_token
            )
        except _REFUSED as err:
            raise self._refused(state, err) from err

    async def revoke_session(self, session_id: str) -> bool:
        """Revoke one of *this user's* sessions (a revoke button of the devices page);
        revoking the current one also clears the cookie.

        Returns:
            Whether ``session_id`` was an active session of the user (anything else,
            another user's session included, is left alone).

        Raises:
            NoSession: as for :meth:`sessions`.
        """
        state = request_state()
        mine = {s.session_id for s in await self.sessions() if s.active}
        if session_id not in mine:
            return False
        try:
            await self._connection().client.revoke(session_id=session_id, reason="web: device")
        except _REFUSED as err:
            raise self._refused(state, err) from err
        log.info("revoked device sid=%s", session_id)
        if state.session is not None and state.session.session_id == session_id:
            self.end(state)
        return True

    def _refused(self, state: RequestState, err: Unauthenticated | PermissionDenied) -> NoSession:
        """tokensvc refused a call made for the request's session: end it here too."""
        sid = state.session.session_id if state.session is not None else "-"
        log.info("session refused by tokensvc sid=%s: %s", sid, err.code.name)
        self.end(state)
        return NoSession("the session has ended")

    def end(self, state: RequestState) -> None:
        """Forget the request's session and clear its cookie (and renew the CSRF token)."""
        state.session = None
        state.cookie(self.cookies.clear_session())
        self._new_csrf(state)

    def _new_csrf(self, state: RequestState) -> None:
        state.csrf = self.cookies.new_csrf()
        state.cookie(self.cookies.set_csrf(state.csrf))
