"""Open redirects and hardening headers: the browser is only ever sent to this backend's
own origins, and the helper's pages and JSON carry nosniff, a restrictive CSP and a
same-origin referrer policy."""

from __future__ import annotations

import pytest

from tests.web.conftest import GOOD, ORIGIN
from tokensvc_client import web

BASE = dict(origins=["https://app.test", "https://other.app.test:8443"], issuer="i", audience="a")


@pytest.mark.parametrize(
    "login_url",
    [
        "//evil.example",
        "//evil.example/login",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",  # browsers drop the tab: //evil.example
        "/\n/evil.example",
        " //evil.example",
        "https://evil.example/login",
        "https://app.test.evil.example/login",
        "https://app.test@evil.example/login",
        "https://user@app.test/login",
        "http://app.test/login",  # not an https origin
        "https://app.test:444/login",
        "javascript:alert(1)",
        "https:/evil.example",
        "login",
        "",
    ],
)
def test_login_url_elsewhere_is_refused_naming_the_setting(cookie_key, login_url):
    with pytest.raises(ValueError, match="login_url"):
        web.WebSettings.create(cookie_keys=[cookie_key], login_url=login_url, **BASE)


@pytest.mark.parametrize(
    "login_url",
    [
        "/login",
        "/",
        "/sign-in?from=devices",
        "https://app.test/login",
        "https://APP.test:443/login",
        "https://other.app.test:8443/",
    ],
)
def test_login_url_on_the_own_origins_is_accepted(cookie_key, login_url):
    settings = web.WebSettings.create(cookie_keys=[cookie_key], login_url=login_url, **BASE)
    assert settings.login_url == login_url


def test_a_settings_object_built_directly_is_checked_by_the_backend(cookie_key):
    settings = web.WebSettings(
        origins=("https://app.test",),
        cookie_keys=(cookie_key,),
        issuer="i",
        audience="a",
        login_url="//evil.example",
    )
    with pytest.raises(ValueError, match="login_url"):
        web.WebBackend(settings, target="127.0.0.1:1", insecure=True)


def test_redirects_ignore_a_next_parameter(make_web):
    w = make_web(login_url="/login")
    w.login("alice")
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    response = w.client.post(
        "/logout?next=//evil.example",
        content=f"csrf_token={token}&next=//evil.example",
        headers={"origin": ORIGIN, "content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/login"
    ended = w.client.get("/me?next=//evil.example", follow_redirects=False)
    assert ended.status_code == 303 and ended.headers["location"] == "/login"


def test_the_devices_page_has_a_restrictive_policy(make_web):
    w = make_web()
    w.login("alice")
    page = w.client.get("/devices")
    assert page.status_code == 200
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "same-origin"
    policy = {
        d.split()[0]: d.split()[1:] for d in page.headers["content-security-policy"].split("; ")
    }
    assert policy["default-src"] == ["'none'"]  # no script, image, font, frame, fetch
    assert policy["style-src"] == ["'unsafe-inline'"]  # the page's own <style>
    assert policy["form-action"][0] == "'self'" and ORIGIN in policy["form-action"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert "<script" not in page.text and "<link" not in page.text and "<img" not in page.text


def test_json_answers_are_nosniff(make_web):
    w = make_web()
    assert w.client.get("/api/sessions").headers["x-content-type-options"] == "nosniff"  # 401
    assert w.client.post("/act").headers["x-content-type-options"] == "nosniff"  # 403 csrf
    w.login("alice")
    listed = w.client.get("/api/sessions")
    assert listed.status_code == 200 and listed.headers["x-content-type-options"] == "nosniff"
    revoked = w.client.delete("/api/sessions", headers=GOOD)
    assert revoked.status_code == 204 and revoked.headers["x-content-type-options"] == "nosniff"
