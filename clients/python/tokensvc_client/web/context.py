"""The session of the request being handled, for handlers behind the web middleware.

Like :func:`tokensvc_client.current_claims` behind the gRPC interceptors, the middleware
puts the request's state in a ``contextvars.ContextVar``; handlers (async, or sync ones
that Starlette runs in a thread with a copy of the context) read it with
:func:`current_session`, :func:`current_claims`, :func:`csrf_token` and get gRPC call
credentials with :func:`session_call_credentials`. Cookies that handlers cause (a new
session, a logout) are collected here and written by the middleware onto the response.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

import grpc

from tokensvc_client.errors import TokenServiceError
from tokensvc_client.results import TokenPair
from tokensvc_client.verifier import Claims

__all__ = [
    "NoSession",
    "WebSession",
    "csrf_token",
    "current_claims",
    "current_session",
    "current_session_or_none",
    "session_call_credentials",
]


class NoSession(TokenServiceError, LookupError):
    """The request has no (valid) session. Raised out of a handler, the middleware answers
    it like an ended session: 401, or a redirect to the login page."""


@dataclass(frozen=True, slots=True)
class WebSession:
    """The verified session of a request.

    Attributes:
        claims: the verified claims of its access token.
        session_id: the session (refresh family) id.
        access_expires_at: epoch seconds.
    """

    claims: Claims
    tokens: TokenPair = field(repr=False)

    @property
    def session_id(self) -> str:
        return self.tokens.session_id

    @property
    def access_expires_at(self) -> float:
        return self.tokens.access_expires_at


@dataclass(slots=True)
class RequestState:
    """What the middleware knows about one request, and the cookies to send back."""

    csrf: str
    session: WebSession | None = None
    #: ``Set-Cookie`` lines by cookie name: a later one for the same cookie replaces it
    set_cookies: dict[str, str] = field(default_factory=dict)

    def cookie(self, line: str) -> None:
        """Send ``line`` (a ``Set-Cookie`` value) with the response."""
        self.set_cookies[line.split("=", 1)[0]] = line


_STATE: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar(
    "tokensvc_client.web.request", default=None
)


def request_state() -> RequestState:
    """The current request's state.

    Raises:
        RuntimeError: outside a request handled by the web middleware (a setup error).
    """
    state = _STATE.get()
    if state is None:
        raise RuntimeError("not inside a request handled by tokensvc_client.web's middleware")
    return state


def enter(state: RequestState) -> contextvars.Token[RequestState | None]:
    """For the middleware: make ``state`` the current request's."""
    return _STATE.set(state)


def leave(token: contextvars.Token[RequestState | None]) -> None:
    """For the middleware: undo :func:`enter`."""
    _STATE.reset(token)


def current_session_or_none() -> WebSession | None:
    """The request's verified session, or ``None`` for an anonymous request."""
    return request_state().session


def current_session() -> WebSession:
    """The request's verified session.

    Raises:
        NoSession: an anonymous request (the middleware turns it into 401/redirect).
    """
    session = request_state().session
    if session is None:
        raise NoSession("no session")
    return session


def current_claims() -> Claims:
    """The verified claims of the request's session (raises :class:`NoSession`)."""
    return current_session().claims


def csrf_token() -> str:
    """The double-submit token to render into this response's forms (hidden field
    ``csrf_token``); the middleware sets its cookie when it is new."""
    return request_state().csrf


def session_call_credentials() -> grpc.CallCredentials:
    """gRPC call credentials carrying the session's access token, for calling services of
    the mesh on the user's behalf. The middleware refreshed the token if it was due, so it
    is valid for at least the refresh margin (or half its lifetime).

    Raises:
        NoSession: an anonymous request.
    """
    return grpc.access_token_call_credentials(current_session().tokens.access_token)
