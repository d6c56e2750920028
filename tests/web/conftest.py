"""Fixtures of the web helper's tests: a small Starlette app behind the helper, against a
real tokensvc over loopback (real Redis), driven with Starlette's TestClient over
``https://testserver`` (the cookies are Secure: an httpx client sends them only there).

The app: ``POST /login`` (form or JSON ``subject``, ``label``) starts a session;
``GET /me`` answers the session's claims (``NoSession`` -> 401); ``GET /public`` is a
public path; ``POST /act`` is a state-changing action (counts calls); plus the helper's
devices routes and logout.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.support import ServerThread
from tokensvc.config import Settings
from tokensvc_client import web
from tokensvc_client.web.refresh import StoredSession

ORIGIN = "https://testserver"
#: what a same-origin fetch() of the app's own JavaScript sends
GOOD = {"origin": ORIGIN, "x-tokensvc-csrf": "1"}
AUDIT_LOGGER = "tokensvc.audit"


class AuditCounter(logging.Handler):
    """Counts tokensvc's audit events by name, as the real server records them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(str(getattr(record, "event", "")))

    def count(self, event: str) -> int:
        return self.events.count(event)


@dataclass
class Web:
    """A running app + tokensvc; ``client`` is inside its ``with`` (one event loop)."""

    server: ServerThread
    backend: web.WebBackend
    client: TestClient
    audit: AuditCounter
    acts: list[str] = field(default_factory=list)
    refusals: list[web.CsrfRefusal] = field(default_factory=list)

    def login(self, subject: str = "alice", label: str = "laptop") -> Any:
        response = self.client.post(
            "/login", json={"subject": subject, "label": label}, headers=GOOD
        )
        assert response.status_code == 200, response.text
        return response

    def session_cookie(self) -> str | None:
        return self.client.cookies.get(self.backend.settings.session_cookie)

    def _stored(self) -> StoredSession:
        cookie = self.session_cookie()
        assert cookie is not None, "no session cookie"
        stored = self.backend.cookies.session({self.backend.settings.session_cookie: cookie})
        assert stored is not None, "the session cookie does not open"
        return stored

    def wait_until_expired(self) -> None:
        """Until the session's access token has expired on the helper's clock."""
        # a sleep to the token's exp: the token service accepts it for --leeway longer,
        # so nothing observable marks the moment the helper stops using it
        time.sleep(max(0.0, self._stored().tokens.access_expires_at - time.time()) + 0.05)

    def wait_until_due(self) -> None:
        """Until the session's access token is due for refresh (half its lifetime here)."""
        # a sleep: "due" is the helper's own reading of its clock, nothing else marks it
        time.sleep(max(0.0, self._stored().refresh_at - time.time()) + 0.05)


def build_app(backend: web.WebBackend, acts: list[str]) -> Starlette:
    async def login(request: Request) -> Response:
        if request.headers.get("content-type", "").startswith("application/json"):
            data = await request.json()
        else:
            data = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
        session = await backend.start(data["subject"], session_label=data.get("label", ""))
        return JSONResponse({"sid": session.session_id})

    async def me(request: Request) -> Response:
        claims = web.current_claims()
        return JSONResponse({"sub": claims.subject, "jti": claims.token_id})

    async def public(request: Request) -> Response:
        session = web.current_session_or_none()
        return JSONResponse({"anonymous": session is None, "csrf": web.csrf_token()})

    async def act(request: Request) -> Response:
        acts.append(web.current_claims().subject)
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await backend.aclose()

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/login", login, methods=["POST"]),
            Route("/me", me),
            Route("/public", public),
            Route("/act", act, methods=["POST"]),
            *web.session_routes(backend),
        ],
        middleware=[Middleware(web.TokenSessionMiddleware, backend=backend)],
    )


@pytest.fixture
def cookie_key() -> bytes:
    return web.generate_key()


@pytest.fixture
def make_web(
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
    cookie_key: bytes,
) -> Iterator[Callable[..., Web]]:
    """``make_web(access_ttl=..., server=..., tls=..., **web_settings)``: start tokensvc
    (or reuse ``server``; ``tls``: the backend's ``ca``/``cert``/``key`` for it) and the
    app; closes them at the end."""
    opened: list[TestClient] = []
    counter = AuditCounter()
    audit_log = logging.getLogger(AUDIT_LOGGER)
    audit_log.addHandler(counter)
    previous = audit_log.level
    audit_log.setLevel(logging.INFO)

    def make(
        access_ttl: int = 900,
        server: ServerThread | None = None,
        keys: tuple[bytes, ...] | None = None,
        revocation_check: Any = None,
        tls: dict[str, Any] | None = None,
        **options: Any,
    ) -> Web:
        if server is None:
            server = start_server(make_settings(access_ttl=access_ttl, audit_log_all=True))
        refusals: list[web.CsrfRefusal] = []
        settings = web.WebSettings.create(
            origins=[ORIGIN],
            cookie_keys=keys or (cookie_key,),
            issuer=server.settings.issuer,
            audience="web",
            extra_audience=["mesh", "tokensvc"],  # tokensvc's own: the devices page
            **options,
        )
        backend = web.WebBackend(
            settings,
            target=server.target,
            **(tls or {"insecure": True}),
            audit=refusals.append,
            revocation_check=revocation_check,
        )
        acts: list[str] = []
        client = TestClient(build_app(backend, acts), base_url=ORIGIN)
        client.__enter__()
        opened.append(client)
        return Web(server, backend, client, counter, acts, refusals)

    yield make
    for client in opened:
        client.__exit__(None, None, None)
    audit_log.removeHandler(counter)
    audit_log.setLevel(previous)
