"""A session that tokensvc refuses on a call made for it is signed out, never answered 500.

Without a revocation feed, a session revoked elsewhere ("sign out everywhere" in another
browser) keeps a locally valid access token until its refresh; the devices page's
ListSessions (with that token: the backend is no ListSessions admin under the caller
policy) is then answered UNAUTHENTICATED by tokensvc. That, or PERMISSION_DENIED on any call
the helper makes for the session, ends the browser session: cookie cleared, 303 to the
login page for pages, 401 for JSON.
"""

from __future__ import annotations

import logging

import pytest

from tests.web.conftest import GOOD, ORIGIN

S = "__Host-tokensvc-session"
CLEARED = f"{S}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict"
FORM = {"origin": ORIGIN, "content-type": "application/x-www-form-urlencoded"}
#: the backend's identity (login) may Issue and Revoke, and is no ListSessions admin
POLICY = """
[rpc.Issue]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
[rpc.Revoke]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
"""


@pytest.fixture
def laptop_and_phone(make_web, mtls_service):
    """``make(**settings)``: alice signed in on a laptop and a phone (two backends of one
    mTLS tokensvc), then signed out everywhere from the phone."""

    def make(**options):
        svc = mtls_service(POLICY)
        login = svc.pki["login"]
        tls = {"ca": login.ca, "cert": login.cert, "key": login.key}
        laptop = make_web(server=svc.server, tls=tls, **options)
        phone = make_web(server=svc.server, tls=tls, **options)
        phone.login("alice", label="phone")
        laptop.login("alice", label="laptop")
        assert laptop.client.get("/devices").status_code == 200
        assert phone.client.delete("/api/sessions", headers=GOOD).status_code == 204
        # no feed: the laptop's access token is still accepted here
        assert laptop.client.get("/me").status_code == 200
        return laptop

    return make


def _request(w, method: str, path: str):
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    if method == "POST":
        body = f"session_id=x&csrf_token={token}"
        return w.client.post(path, content=body, headers=FORM, follow_redirects=False)
    headers = GOOD if method == "DELETE" else {}
    return w.client.request(method, path, headers=headers, follow_redirects=False)


@pytest.mark.parametrize(
    ("method", "path", "page"),
    [
        ("GET", "/devices", True),
        ("POST", "/devices/revoke", True),
        ("GET", "/api/sessions", False),
        ("DELETE", "/api/sessions/some-session", False),
    ],
)
def test_a_session_revoked_elsewhere_is_signed_out(laptop_and_phone, caplog, method, path, page):
    w = laptop_and_phone(login_url="/login")
    response = _request(w, method, path)
    if page:
        assert response.status_code == 303 and response.headers["location"] == "/login"
    else:
        assert response.status_code == 401
        assert response.json() == {"error": "unauthenticated"}
    assert CLEARED in response.headers.get_list("set-cookie")
    assert response.headers["cache-control"] == "no-store"
    assert w.session_cookie() is None
    assert w.client.get("/me", follow_redirects=False).status_code == 303
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_without_login_url_a_page_answers_401(laptop_and_phone):
    w = laptop_and_phone()
    response = w.client.get("/devices")
    assert response.status_code == 401 and CLEARED in response.headers.get_list("set-cookie")


ISSUE_ONLY = """
[rpc.Issue]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
"""


def test_permission_denied_on_a_call_for_the_session_ends_it(make_web, mtls_service):
    # a backend whose identity may Issue but not Revoke: tokensvc answers PERMISSION_DENIED
    svc = mtls_service(ISSUE_ONLY)
    login = svc.pki["login"]
    tls = {"ca": login.ca, "cert": login.cert, "key": login.key}
    w = make_web(server=svc.server, tls=tls, login_url="/login")
    w.login("alice")
    sid = w.client.get("/api/sessions").json()["sessions"][0]["session_id"]

    refused = w.client.delete(f"/api/sessions/{sid}", headers=GOOD)
    assert refused.status_code == 401 and CLEARED in refused.headers.get_list("set-cookie")

    w.login("alice")
    everywhere = w.client.delete("/api/sessions", headers=GOOD)
    assert everywhere.status_code == 401 and CLEARED in everywhere.headers.get_list("set-cookie")

    w.login("alice")  # logout completes here even though tokensvc refused the Revoke
    logout = w.client.post("/logout", headers=GOOD, follow_redirects=False)
    assert logout.status_code == 303 and logout.headers["location"] == "/login"
    assert CLEARED in logout.headers.get_list("set-cookie")
