"""Web backend-for-frontend helper (``pip install tokensvc-client[web]``): browser sessions
backed by tokensvc, with the tokens kept out of JavaScript's reach.

Following the IETF "OAuth 2.0 for Browser-Based Applications" BFF pattern: the browser
holds only an encrypted ``__Host-`` cookie (HttpOnly, Secure, SameSite=Strict); the web
backend keeps the tokens, verifies and refreshes them, defends every state-changing
request against CSRF, and calls the mesh with the user's access token. Starlette/ASGI::

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from tokensvc_client import web

    settings = web.WebSettings.create(
        origins=["https://app.example.com"], cookie_keys=[key], issuer="https://tokensvc",
        audience="web",
    )
    backend = web.WebBackend(settings, target="tokensvc:50051", ca=..., cert=..., key=...)
    app = Starlette(
        routes=[*my_routes, *web.session_routes(backend)],
        middleware=[Middleware(web.TokenSessionMiddleware, backend=backend)],
    )

    async def login(request):                 # after checking the password, your way
        await backend.start("alice", session_label="Firefox on laptop")
        return RedirectResponse("/", 303)

    async def home(request):
        claims = web.current_claims()         # NoSession -> 401 / redirect to login
        creds = web.session_call_credentials()  # call the mesh as the user
"""

from tokensvc_client.web.backend import WebBackend
from tokensvc_client.web.context import (
    NoSession,
    WebSession,
    csrf_token,
    current_claims,
    current_session,
    current_session_or_none,
    session_call_credentials,
)
from tokensvc_client.web.cookies import CookieReason, CookieRefusal
from tokensvc_client.web.csrf import CsrfReason, CsrfRefusal
from tokensvc_client.web.devices import render_devices, session_routes
from tokensvc_client.web.middleware import TokenSessionMiddleware
from tokensvc_client.web.sealing import CookieSealer, generate_key
from tokensvc_client.web.settings import WebSettings

__all__ = [
    "CookieReason",
    "CookieRefusal",
    "CookieSealer",
    "CsrfReason",
    "CsrfRefusal",
    "NoSession",
    "TokenSessionMiddleware",
    "WebBackend",
    "WebSession",
    "WebSettings",
    "csrf_token",
    "current_claims",
    "current_session",
    "current_session_or_none",
    "generate_key",
    "render_devices",
    "session_call_credentials",
    "session_routes",
]
