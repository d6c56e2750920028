"""No token or cookie value reaches a log line of the web helper (login, refresh, CSRF
refusal, tampered cookie, devices, logout; every logger at DEBUG)."""

from __future__ import annotations

import logging

from tests.web.conftest import GOOD

SESSION = "__Host-tokensvc-session"


def test_no_token_or_cookie_in_logs(make_web, caplog):
    caplog.set_level(logging.DEBUG)
    w = make_web(access_ttl=1)
    secrets: list[str] = []

    def collect() -> None:
        cookie = w.session_cookie()
        stored = w.backend.cookies.session({SESSION: cookie})
        secrets.extend([cookie, stored.tokens.access_token, stored.tokens.refresh_token])
        secrets.append(stored.tokens.access_token.split(".")[2])
        secrets.append(w.client.cookies.get("__Host-tokensvc-csrf"))

    w.login()
    collect()
    w.wait_until_due()
    assert w.client.get("/me").status_code == 200  # refreshed
    collect()
    w.client.post("/act", headers={"origin": "https://evil.test"})
    assert w.client.get("/devices").status_code == 200
    w.client.post("/logout", headers=GOOD)
    w.client.get("/me", headers={"cookie": f"{SESSION}={secrets[0][:-4]}AAAA"})
    assert "session started" in caplog.text and "csrf: refused" in caplog.text
    for secret in secrets:
        assert secret and secret not in caplog.text
