"""The session cookie: exact attributes, lifetime, sealing, key rotation, tampering."""

from __future__ import annotations

import re
import time

from tests.web.conftest import GOOD
from tokensvc_client import web
from tokensvc_client.v1 import tokensvc_pb2 as pb

SESSION = "__Host-tokensvc-session"
CSRF = "__Host-tokensvc-csrf"
ATTRS = "; Path=/; Secure; HttpOnly; SameSite=Strict"


def _set_cookies(response) -> dict[str, str]:
    lines = response.headers.get_list("set-cookie")
    by_name = {line.split("=", 1)[0]: line for line in lines}
    assert len(by_name) == len(lines), "a cookie set twice in one response"
    return by_name


def test_login_sets_exact_host_cookies_bounded_by_the_session(make_web):
    w = make_web()
    before = time.time()
    response = w.login()
    cookies = _set_cookies(response)
    session = cookies[SESSION]
    match = re.fullmatch(rf"{SESSION}=([A-Za-z0-9_.-]+); Max-Age=(\d+){re.escape(ATTRS)}", session)
    assert match, session
    assert "Domain" not in session and "domain" not in session
    # lives as long as the refresh token: the idle TTL here, never past the family's end
    [listed] = w.server.stub().ListSessions(pb.ListSessionsRequest(subject="alice")).sessions
    max_age = int(match.group(2))
    assert max_age <= listed.expires_at.seconds - before + 1
    assert abs(max_age - w.server.settings.refresh_idle_ttl) <= 2
    assert re.fullmatch(rf"{CSRF}=[A-Za-z0-9_-]{{43}}{re.escape(ATTRS)}", cookies[CSRF])
    assert response.headers["cache-control"] == "no-store"


def test_lax_is_configurable(make_web):
    w = make_web(same_site="Lax")
    cookies = _set_cookies(w.login())
    assert cookies[SESSION].endswith("; Path=/; Secure; HttpOnly; SameSite=Lax")
    # the CSRF defence is unchanged: a cross-origin post is still refused
    refused = w.client.post("/act", headers={"origin": "https://evil.test", "x-tokensvc-csrf": "1"})
    assert refused.status_code == 403 and w.acts == []


def test_cookie_holds_no_token_in_the_clear(make_web):
    w = make_web()
    w.login()
    value = w.session_cookie()
    pair = w.backend.cookies.session({SESSION: value})
    assert pair is not None
    for secret in (pair.tokens.access_token, pair.tokens.refresh_token):
        for part in secret.replace("_", ".").split("."):
            if len(part) >= 8:
                assert part not in value


def _flip(value: str, index: int) -> str:
    char = value[index]
    return value[:index] + ("A" if char != "A" else "B") + value[index + 1 :]


def test_tampered_cookie_is_no_session_and_is_cleared(make_web):
    w = make_web()
    w.login()
    good = w.session_cookie()
    for bad in (_flip(good, len(good) // 2), _flip(good, -2), good[:-10], "garbage", ""):
        w.client.cookies.clear()
        response = w.client.get("/me", headers={"cookie": f"{SESSION}={bad}"})
        assert response.status_code == 401, bad
        if bad:
            assert f"{SESSION}=; Max-Age=0{ATTRS}" in response.headers.get_list("set-cookie")
    # a sealed value moved into another cookie does not open there either
    assert w.backend.cookies.session({SESSION: good}) is not None
    sealer = web.CookieSealer(w.backend.settings.cookie_keys)
    assert sealer.open(CSRF, good) is None


def test_cookie_of_another_key_is_no_session(make_web, cookie_key):
    w = make_web()
    w.login()
    foreign = make_web(server=w.server, keys=(web.generate_key(),))
    response = foreign.client.get("/me", headers={"cookie": f"{SESSION}={w.session_cookie()}"})
    assert response.status_code == 401


def test_key_rotation_opens_old_cookies_and_seals_with_the_new_key(make_web, cookie_key):
    old = make_web()
    old.login()
    old_cookie = old.session_cookie()
    new_key = web.generate_key()
    rotated = make_web(server=old.server, keys=(new_key, cookie_key))
    assert (
        rotated.client.get("/me", headers={"cookie": f"{SESSION}={old_cookie}"}).status_code == 200
    )
    rotated.client.cookies.clear()
    rotated.login("bob")
    new_cookie = rotated.session_cookie()
    assert new_cookie.split(".")[0] != old_cookie.split(".")[0]  # another key id
    # the old key alone cannot open what the new key sealed
    assert web.CookieSealer([cookie_key]).open(SESSION, new_cookie) is None
    assert web.CookieSealer([new_key]).open(SESSION, new_cookie) is not None


def test_settings_refuse_what_cannot_be_right(cookie_key):
    base = dict(origins=["https://app.test"], cookie_keys=[cookie_key], issuer="i", audience="a")
    for bad in (
        {"origins": ["http://app.test"]},
        {"origins": []},
        {"cookie_keys": [b"short"]},
        {"cookie_keys": []},
        {"same_site": "None"},
        {"session_cookie": "session"},
        {"login_url": "https://elsewhere.test/login"},
    ):
        try:
            web.WebSettings.create(**{**base, **bad})
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    assert web.WebSettings.create(**base).origins == ("https://app.test",)


def test_logout_revokes_the_session_and_clears_the_cookie(make_web):
    w = make_web()
    w.login()
    pair = w.backend.cookies.session({SESSION: w.session_cookie()})
    response = w.client.post("/logout", headers=GOOD, follow_redirects=False)
    assert response.status_code == 303
    assert f"{SESSION}=; Max-Age=0{ATTRS}" in response.headers.get_list("set-cookie")
    stub = w.server.stub()
    assert not stub.Introspect(pb.IntrospectRequest(token=pair.tokens.refresh_token)).active
    assert w.client.get("/me").status_code == 401
