"""Example web backend (backend-for-frontend) on tokensvc, over HTTPS on loopback.

Run tokensvc with ``make run`` in one terminal, then::

    python examples/web/app.py

and open https://localhost:8443 (the development CA is .tokensvc/certs/ca.pem; the
certificates are made on first start, as ``tokensvc certs`` does). Sign in as ``demo`` /
``demo-password``. The home page calls a protected gRPC service (``demo.Profile``, started
in this process behind ``AioAuthInterceptor``) with the session's access token; "Your
devices" lists and revokes sessions.

Outside this repository's .venv: ``pip install -r examples/web/requirements.txt``.

Environment (all optional): ``TOKENSVC_TARGET`` (127.0.0.1:50051, plaintext loopback as
``make run`` serves), ``TOKENSVC_ISSUER`` (https://tokensvc.local), ``WEB_PORT`` (8443),
``WEB_CERTS`` (.tokensvc/certs), ``WEB_COOKIE_KEY`` (64 hex digits; random per start if
unset, which signs everyone out on restart).
"""

from __future__ import annotations

import contextlib
import hmac
import html
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))

import profile_service  # examples/web/profile_service.py

from tokensvc_client import web
from tokensvc_client.aio import AsyncTokenClient

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"


@dataclass(frozen=True)
class Config:
    tokensvc: str
    issuer: str
    port: int
    certs: Path
    cookie_key: bytes

    @classmethod
    def from_env(cls) -> Config:
        key = os.environ.get("WEB_COOKIE_KEY")
        return cls(
            tokensvc=os.environ.get("TOKENSVC_TARGET", "127.0.0.1:50051"),
            issuer=os.environ.get("TOKENSVC_ISSUER", "https://tokensvc.local"),
            port=int(os.environ.get("WEB_PORT", "8443")),
            certs=Path(os.environ.get("WEB_CERTS", ".tokensvc/certs")),
            cookie_key=bytes.fromhex(key) if key else web.generate_key(),
        )


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;color:#111;margin:2rem;max-width:40rem}}
label{{display:block;margin-top:.8rem}}input{{font:inherit;padding:.3rem}}
button{{font:inherit;margin-top:1rem;padding:.3rem .8rem;color:#fff;background:#0b3d91;
border:2px solid #0b3d91;border-radius:4px}}button:focus{{outline:3px solid #c60}}</style>
</head><body><main>{body}</main></body></html>""",
        status_code=status,
        headers={"cache-control": "no-store"},
    )


def _login_form(error: str = "") -> str:
    alert = f'<p role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<h1>Sign in</h1>{alert}
<form method="post" action="/login">
<input type="hidden" name="csrf_token" value="{html.escape(web.csrf_token())}">
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>"""


def _device_label(request: Request) -> str:
    agent = request.headers.get("user-agent", "")
    for name in ("HeadlessChrome", "Chrome", "Firefox", "Safari", "curl"):
        if name in agent:
            return f"{name} browser" if name != "curl" else "curl"
    return "Web browser"


def create_app(config: Config) -> Starlette:
    """The example app: login, a home page calling the profile service, devices."""
    settings = web.WebSettings.create(
        origins=[f"https://localhost:{config.port}", f"https://127.0.0.1:{config.port}"],
        cookie_keys=[config.cookie_key],  # 32 random bytes each; the first one seals
        issuer=config.issuer,
        audience="demo-web",
        # the service the backend calls for the user, and tokensvc's own audience, which
        # ListSessions requires of the user's token (the devices page)
        extra_audience=[profile_service.AUDIENCE, "tokensvc"],
        login_url="/login",
        public_paths=["/login"],
    )
    # plaintext loopback, as `make run` serves; in production ca=, cert=, key= (mTLS)
    backend = web.WebBackend(settings, target=config.tokensvc, insecure=True)
    profile: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tokens = AsyncTokenClient(config.tokensvc, insecure=True)
        server, profile["target"] = await profile_service.start(tokens, config.issuer)
        yield
        await server.stop(1)
        await tokens.close()
        await backend.aclose()

    async def login_page(request: Request) -> Response:
        if web.current_session_or_none() is not None:
            return RedirectResponse("/", status_code=303)
        return _page("Sign in", _login_form())

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        user = form.get("username", [""])[0]
        password = form.get("password", [""])[0]
        good = hmac.compare_digest(user.encode(), DEMO_USER.encode()) & hmac.compare_digest(
            password.encode(), DEMO_PASSWORD.encode()
        )
        if not good:
            return _page("Sign in", _login_form("Wrong user name or password."), 401)
        # the password checked (your own way): the session starts, its cookie is set
        await backend.start(user, roles=("reader",), session_label=_device_label(request))
        return RedirectResponse("/", status_code=303)

    async def home(request: Request) -> Response:
        claims = web.current_claims()  # anonymous: redirected to /login
        creds = web.session_call_credentials()  # gRPC call credentials with the user's token
        answer = await profile_service.who_am_i(profile["target"], creds)
        return _page(
            "Home",
            f"""<h1>Hello, {html.escape(claims.subject)}</h1>
<p>The profile service says: <output id="profile">{html.escape(str(answer["subject"]))}\
</output></p>
<p><a href="/devices">Your devices</a></p>
<form method="post" action="/logout">
<input type="hidden" name="csrf_token" value="{html.escape(web.csrf_token())}">
<button type="submit">Sign out</button></form>""",
        )

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", home),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            *web.session_routes(backend),
        ],
        middleware=[Middleware(web.TokenSessionMiddleware, backend=backend)],
    )
    return app


def main() -> None:
    config = Config.from_env()
    if not (config.certs / "server.pem").exists():
        from tokensvc.cli.devcerts import write_dev_pki  # the development PKI, as `tokensvc certs`

        write_dev_pki(config.certs)
    print(f"serving https://localhost:{config.port} (CA: {config.certs / 'ca.pem'})", flush=True)
    uvicorn.run(
        create_app(config),
        host="127.0.0.1",
        port=config.port,
        ssl_certfile=str(config.certs / "server.pem"),
        ssl_keyfile=str(config.certs / "server.key"),
        log_level="warning",
    )


if __name__ == "__main__":
    main()
