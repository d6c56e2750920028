"""Real headless Chromium against the web helper, for the browser tests.

:func:`chrome` starts Debian's Chromium through the system chromedriver (never a downloaded
browser), trusting exactly the test server's key. :class:`SiblingSite` serves a small app
behind the helper on ``https://app.example.test:<port>`` and an "attacker" page on the
sibling ``https://evil.example.test:<port>``; Chromium resolves ``*.example.test`` to
127.0.0.1 (``--host-resolver-rules``), so no DNS is asked and all traffic stays on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import http.server
import shutil
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from tests.support import ServerThread
from tokensvc.redis.embedded import free_port
from tokensvc_client import web

SESSION = "__Host-tokensvc-session"
CSRF = "__Host-tokensvc-csrf"
WAIT = 10  # seconds: the most any single step may take
HOST_RULES = "MAP *.example.test 127.0.0.1"


def spki_hash(cert_pem: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def chrome(profile: Path, server_cert: Path, *flags: str) -> webdriver.Chrome:
    """Headless Chromium with its own profile directory, trusting ``server_cert``'s key."""
    chromium = shutil.which("chromium")
    chromedriver = shutil.which("chromedriver")
    assert chromium and chromedriver, "run .ci/tools.d/chromium.sh (make test does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        # trust exactly the test server's key (the dev CA is not in any store)
        f"--ignore-certificate-errors-spki-list={spki_hash(server_cert)}",
        *flags,
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT)
    return driver


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"</head><body><main>{body}</main></body></html>",
        headers={"cache-control": "no-store"},
    )


def site_app(backend: web.WebBackend) -> Starlette:
    """Sign in by name (``/login``), a home page naming the session, the devices routes."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await backend.aclose()

    async def login_page(request: Request) -> Response:
        return _page(
            "Sign in",
            f"""<form method="post" action="/login">
<input type="hidden" name="csrf_token" value="{html.escape(web.csrf_token())}">
<label for="subject">User</label><input id="subject" name="subject">
<button type="submit">Sign in</button></form>""",
        )

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8"))
        await backend.start(form["subject"][0], session_label="browser")
        return RedirectResponse("/", status_code=303)

    async def home(request: Request) -> Response:
        session = web.current_session()
        return _page(
            "Home",
            f"""<output id="subject">{html.escape(session.claims.subject)}</output>
<output id="sid">{html.escape(session.session_id)}</output>
<form method="post" action="/logout">
<input type="hidden" name="csrf_token" value="{html.escape(web.csrf_token())}">
<button type="submit">Sign out</button></form>""",
        )

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", home),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            *web.session_routes(backend),
        ],
        middleware=[Middleware(web.TokenSessionMiddleware, backend=backend)],
    )


class _Recorder:
    """ASGI wrapper keeping the raw ``Cookie`` headers of each request to ``/``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cookies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/":
            self.cookies += [v for k, v in scope["headers"] if k == b"cookie"]
        await self.app(scope, receive, send)


class _Sibling(http.server.BaseHTTPRequestHandler):
    """``GET /plant``: a page whose response sets :attr:`set_cookies` (latin-1 bytes)."""

    set_cookies: ClassVar[list[str]] = []
    timeout = 5  # a connection the browser opened speculatively and left idle ends

    def do_GET(self) -> None:
        body = b"<!doctype html><title>planted</title>"
        self.send_response(200 if self.path == "/plant" else 404)
        if self.path == "/plant":
            for line in self.set_cookies:
                self.send_header("set-cookie", line)  # http.server encodes latin-1
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class SiblingSite:
    """The app on ``app.example.test`` against ``tokensvc`` (``tls``: the backend's
    ``ca``/``cert``/``key``, or ``insecure``), and the sibling host."""

    def __init__(self, tokensvc: ServerThread, certs: Path, tls: dict[str, Any]) -> None:
        self.tokensvc = tokensvc
        self.certs = certs
        port = free_port()
        self.origin = f"https://app.example.test:{port}"
        self.key = web.generate_key()
        settings = web.WebSettings.create(
            origins=[self.origin],
            cookie_keys=[self.key],
            issuer=tokensvc.settings.issuer,
            audience="web",
            extra_audience=["tokensvc"],
            login_url="/login",
            public_paths=["/login"],
        )
        backend = web.WebBackend(settings, target=tokensvc.target, **tls)
        self.recorder = _Recorder(site_app(backend))
        config = uvicorn.Config(
            self.recorder,
            host="127.0.0.1",
            port=port,
            ssl_certfile=str(certs / "server.pem"),
            ssl_keyfile=str(certs / "server.key"),
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start")
            time.sleep(0.05)
        self.sibling_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sibling)
        self.sibling_server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs / "server.pem", certs / "server.key")
        self.sibling_server.socket = context.wrap_socket(
            self.sibling_server.socket, server_side=True, do_handshake_on_connect=False
        )
        threading.Thread(target=self.sibling_server.serve_forever, daemon=True).start()
        self.sibling = f"https://evil.example.test:{self.sibling_server.server_address[1]}"

    def plant(self, driver: webdriver.Chrome, *set_cookies: str) -> None:
        """Open the sibling's page in ``driver``: its response sets ``set_cookies``."""
        _Sibling.set_cookies = list(set_cookies)
        driver.get(f"{self.sibling}/plant")
        WebDriverWait(driver, WAIT).until(lambda d: d.title == "planted")

    def login(self, driver: webdriver.Chrome, subject: str) -> None:
        """Sign ``subject`` in with a fresh cookie jar, through the login form."""
        driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
        driver.get(f"{self.origin}/login")
        driver.find_element(By.ID, "subject").send_keys(subject)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(driver, WAIT).until(lambda d: d.title == "Home")

    def stop(self) -> None:
        self.sibling_server.shutdown()
        self.server.should_exit = True
        self.thread.join(10)


def cookie(driver: webdriver.Chrome, name: str) -> dict[str, Any] | None:
    """The browser's host-only cookie ``name`` for the current page, if any (a planted
    ``\xa0``-prefixed name may be reported without its first character: it is the one
    with a ``Domain``)."""
    found = driver.get_cookies()
    return next((c for c in found if c["name"] == name and c["domain"][0] != "."), None)
