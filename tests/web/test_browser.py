"""A real browser against the example web backend (examples/web/app.py) over HTTPS.

Debian's headless Chromium driven by Selenium through the system chromedriver (installed by
.ci/tools.d/chromium.sh; never a downloaded browser). The browser trusts exactly the test
server's key (``--ignore-certificate-errors-spki-list``), nothing else. The example runs as
its own process against a real tokensvc (access tokens of 2 s) on loopback; an "attacker"
page is served from another origin of the same site (``https://localhost`` on another
port: SameSite cookies do not stop it, the CSRF checks must).
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.support import ServerThread, settings_for
from tests.support.topology import prefer_system
from tests.web.browser_support import WAIT, chrome
from tokensvc.cli.devcerts import write_dev_pki
from tokensvc.redis.embedded import RedisProcess, free_port
from tokensvc_client import web
from tokensvc_client.v1 import tokensvc_pb2 as pb

pytestmark = pytest.mark.timeout(90)  # each test takes seconds; a hang must not take minutes

ROOT = Path(__file__).resolve().parents[2]
SESSION = "__Host-tokensvc-session"


class Example:
    """The example app's process, its tokensvc, and what it logged."""

    def __init__(self, tmp: Path, redis: RedisProcess) -> None:
        self.tokensvc = ServerThread(settings_for(redis.url, tmp / "data", access_ttl=2))
        self.certs = tmp / "certs"
        write_dev_pki(self.certs)
        self.key = web.generate_key()
        self.port = free_port()
        self.origin = f"https://localhost:{self.port}"
        self.log = tmp / "example.log"
        env = {
            **os.environ,
            "TOKENSVC_TARGET": self.tokensvc.target,
            "TOKENSVC_ISSUER": self.tokensvc.settings.issuer,
            "WEB_PORT": str(self.port),
            "WEB_CERTS": str(self.certs),
            "WEB_COOKIE_KEY": self.key.hex(),
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "examples/web/app.py")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        context = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.origin}/login", context=context, timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"example did not start: {self.log.read_text()}") from None
                time.sleep(0.1)

    def stub(self):
        return self.tokensvc.stub()

    def tokens(self, cookie_value: str) -> tuple[str, str]:
        """The access and refresh token inside the browser's session cookie (the test
        knows the example's cookie key)."""
        raw = web.CookieSealer([self.key]).open(SESSION, cookie_value)
        assert raw is not None, "not a cookie of the example's key"
        data = json.loads(raw)
        return data["a"], data["r"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.tokensvc.stop()


class _Attacker(http.server.BaseHTTPRequestHandler):
    pages: ClassVar[dict[str, bytes]] = {}
    timeout = 5  # a connection the browser opened speculatively and left idle ends

    def do_GET(self) -> None:
        body = self.pages.get(self.path, b"not found")
        self.send_response(200 if self.path in self.pages else 404)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _attacker(certs: Path, target: str) -> tuple[str, http.server.HTTPServer]:
    """HTTPS pages on another port of localhost that attack ``target``."""
    _Attacker.pages = {
        "/form.html": f"""<!doctype html><html><body>
<form id="f" method="post" action="{target}/devices/sign-out-everywhere">
<input type="hidden" name="csrf_token" value="guessed"></form>
<script>document.getElementById("f").submit()</script></body></html>""".encode(),
        "/fetch.html": f"""<!doctype html><html><body><script>
fetch("{target}/logout", {{method: "POST", credentials: "include", mode: "no-cors",
  headers: {{"content-type": "application/x-www-form-urlencoded"}}, body: "a=1"}})
  .finally(() => {{ document.title = "sent"; }});
</script></body></html>""".encode(),
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    # the handshake happens in each connection's own thread, not in the accepting loop
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"https://localhost:{server.server_address[1]}", server


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Iterator[Example]:
    # its own Redis, not the session's: that one holds the deployment secrets of earlier
    # tests wrapped under their KEKs (this tokensvc could not decrypt them) and is flushed
    # by the function-scoped fixtures while this module-scoped server still runs
    tmp = tmp_path_factory.mktemp("web-example")
    redis = RedisProcess(tmp / "redis", prefer_system=prefer_system()).start()
    try:
        app = Example(tmp, redis)
    except BaseException:
        redis.stop()
        raise
    yield app
    app.stop()
    redis.stop()


@pytest.fixture(scope="module")
def browser(example, tmp_path_factory) -> Iterator[webdriver.Chrome]:
    driver = chrome(tmp_path_factory.mktemp("chromium-profile"), example.certs / "server.pem")
    yield driver
    driver.quit()


def _login(browser, example) -> None:
    browser.delete_all_cookies()
    browser.get(f"{example.origin}/login")
    browser.find_element(By.ID, "username").send_keys("demo")
    browser.find_element(By.ID, "password").send_keys("demo-password")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, WAIT).until(lambda d: d.title == "Home")
    assert browser.find_element(By.ID, "profile").text == "demo"  # via the gRPC service


def _session_cookie(browser) -> dict | None:
    return next((c for c in browser.get_cookies() if c["name"] == SESSION), None)


def _active_sessions(example) -> set[str]:
    listed = example.stub().ListSessions(pb.ListSessionsRequest(subject="demo")).sessions
    return {s.session_id for s in listed if s.active}


def test_login_sets_an_httponly_cookie_and_no_token_reaches_javascript(browser, example):
    _login(browser, example)
    cookie = _session_cookie(browser)
    assert cookie is not None
    assert cookie["httpOnly"] is True and cookie["secure"] is True
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    assert cookie["domain"] == "localhost"  # host-only: no Domain attribute
    cdp = browser.execute_cdp_cmd("Network.getAllCookies", {})["cookies"]
    [seen] = [c for c in cdp if c["name"] == SESSION]
    assert seen["httpOnly"] and seen["secure"] and seen["sameSite"] == "Strict"
    access, refresh = example.tokens(cookie["value"])
    script = """return JSON.stringify({cookie: document.cookie,
        local: Object.entries(localStorage), session: Object.entries(sessionStorage),
        html: document.documentElement.outerHTML})"""
    exposed = browser.execute_script(script)
    assert '"cookie":""' in exposed and '"local":[]' in exposed and '"session":[]' in exposed
    for secret in (access, access.split(".")[1], refresh):
        assert secret not in exposed


def test_pages_from_another_origin_are_refused_and_change_nothing(browser, example):
    _login(browser, example)
    before = _active_sessions(example)
    cookie = _session_cookie(browser)["value"]
    attacker, server = _attacker(example.certs, example.origin)
    try:
        browser.get(f"{attacker}/form.html")  # auto-submits a form to the backend
        WebDriverWait(browser, WAIT).until(lambda d: d.current_url.startswith(example.origin))
        assert "origin_mismatch" in browser.page_source  # refused, 403
        browser.get(f"{attacker}/fetch.html")  # a no-cors fetch with credentials
        WebDriverWait(browser, WAIT).until(lambda d: d.title == "sent")
    finally:
        server.shutdown()
    assert _active_sessions(example) == before
    assert _session_cookie(browser)["value"] == cookie  # no cookie changed or cleared
    browser.get(example.origin)
    assert browser.title == "Home"  # still signed in
    logged = example.log.read_text()
    assert "csrf: refused POST /devices/sign-out-everywhere: origin_mismatch" in logged
    assert "csrf: refused POST /logout: origin_mismatch" in logged


def test_devices_page_shows_the_session_and_revoking_it_logs_out(browser, example):
    _login(browser, example)
    browser.get(f"{example.origin}/devices")
    row = browser.find_element(By.CSS_SELECTOR, 'tr[aria-current="true"]')
    assert "(this device)" in row.text and "HeadlessChrome browser" in row.text
    sid = row.find_element(By.NAME, "session_id").get_attribute("value")
    assert sid in _active_sessions(example)
    button = row.find_element(By.TAG_NAME, "button")
    # the page's own style applies under its Content-Security-Policy; the form posts too
    assert button.value_of_css_property("background-color") == "rgba(11, 61, 145, 1)"
    button.click()
    WebDriverWait(browser, WAIT).until(lambda d: d.title == "Sign in")
    assert _session_cookie(browser) is None
    assert sid not in _active_sessions(example)
    browser.get(example.origin)
    assert browser.title == "Sign in"  # signed out: sent to the login page


def test_the_page_keeps_working_across_an_access_token_expiry(browser, example):
    _login(browser, example)
    first = example.tokens(_session_cookie(browser)["value"])
    time.sleep(2.2)  # the 2 s access token has expired
    browser.get(example.origin)
    assert browser.title == "Home"
    assert browser.find_element(By.ID, "profile").text == "demo"
    second = example.tokens(_session_cookie(browser)["value"])
    assert second[1] != first[1]  # refreshed: a new pair in a new cookie
