"""CSRF: every state-changing request needs its own origin plus the custom header or the
double-submit token; refusals are 403 with a stable reason, logged without cookies."""

from __future__ import annotations

import logging

from tests.web.conftest import GOOD, ORIGIN
from tokensvc_client.web import CsrfReason

FORM = {"content-type": "application/x-www-form-urlencoded"}


REFUSED = [
    ({"x-tokensvc-csrf": "1"}, CsrfReason.ORIGIN_MISSING),
    ({"origin": "https://evil.test", "x-tokensvc-csrf": "1"}, CsrfReason.ORIGIN_MISMATCH),
    ({"origin": "null", "x-tokensvc-csrf": "1"}, CsrfReason.ORIGIN_MISMATCH),
    # another port of the same host: same-site, so SameSite cookies would not stop it
    ({"origin": f"{ORIGIN}:8443", "x-tokensvc-csrf": "1"}, CsrfReason.ORIGIN_MISMATCH),
    ({"origin": "http://testserver", "x-tokensvc-csrf": "1"}, CsrfReason.ORIGIN_MISMATCH),
    ({"sec-fetch-site": "cross-site", "x-tokensvc-csrf": "1"}, CsrfReason.CROSS_SITE),
    ({"sec-fetch-site": "same-site", "x-tokensvc-csrf": "1"}, CsrfReason.CROSS_SITE),
    (
        {"origin": ORIGIN, "sec-fetch-site": "same-site", "x-tokensvc-csrf": "1"},
        CsrfReason.CROSS_SITE,
    ),
    ({"origin": ORIGIN}, CsrfReason.TOKEN_MISSING),
    ({"sec-fetch-site": "same-origin"}, CsrfReason.TOKEN_MISSING),
]


def test_refused_with_a_stable_reason(make_web):
    w = make_web()
    w.login()
    for headers, reason in REFUSED:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            response = w.client.request(method, "/act", headers=headers)
            assert response.status_code == 403, (method, headers)
            assert response.json() == {"error": "csrf", "reason": reason.value}
            assert w.refusals[-1].reason is reason
    assert w.acts == []
    assert len(w.refusals) == 4 * len(REFUSED)


def test_same_origin_with_the_custom_header_passes(make_web):
    w = make_web()
    w.login()
    assert w.client.post("/act", headers=GOOD).status_code == 200
    assert (
        w.client.post("/act", headers={"sec-fetch-site": "same-origin", **GOOD}).status_code == 200
    )
    assert w.acts == ["alice", "alice"]


def test_form_post_needs_the_double_submit_token(make_web):
    w = make_web()
    w.login()
    token = w.client.get("/public").json()["csrf"]
    own = {"origin": ORIGIN, **FORM}
    missing = w.client.post("/act", content="a=1", headers=own)
    wrong = w.client.post("/act", content="csrf_token=" + "x" * 43, headers=own)
    twice = w.client.post("/act", content=f"csrf_token={token}&csrf_token={token}", headers=own)
    assert [r.json()["reason"] for r in (missing, wrong, twice)] == [
        "csrf_token_missing",
        "csrf_token_mismatch",
        "csrf_token_missing",
    ]
    # the right token from the wrong origin is still refused
    foreign = w.client.post(
        "/act", content=f"csrf_token={token}", headers={"origin": "https://evil.test", **FORM}
    )
    assert foreign.json()["reason"] == "origin_mismatch"
    assert w.acts == []
    ok = w.client.post("/act", content=f"a=1&csrf_token={token}", headers=own)
    assert ok.status_code == 200 and w.acts == ["alice"]


def test_form_token_without_its_cookie_is_refused(make_web):
    w = make_web()
    w.login()
    token = w.client.get("/public").json()["csrf"]
    w.client.cookies.delete("__Host-tokensvc-csrf")
    response = w.client.post(
        "/act", content=f"csrf_token={token}", headers={"origin": ORIGIN, **FORM}
    )
    assert response.json()["reason"] == "csrf_token_mismatch"


def test_the_body_reaches_the_app_unchanged_and_is_bounded(make_web):
    w = make_web(max_form_bytes=1024)
    token = w.client.get("/public").json()["csrf"]
    # login is a form post too (login CSRF): the app reads the same body the check read
    response = w.client.post(
        "/login",
        content=f"subject=carol&label=phone&csrf_token={token}",
        headers={"origin": ORIGIN, **FORM},
    )
    assert response.status_code == 200
    assert w.client.get("/me").json()["sub"] == "carol"
    big = w.client.post("/act", content="a=" + "x" * 2000, headers={"origin": ORIGIN, **FORM})
    assert big.status_code == 413


def test_refused_logout_changes_nothing(make_web):
    w = make_web()
    w.login()
    refused = w.client.post("/logout", headers={"origin": "https://evil.test"})
    assert refused.status_code == 403
    assert "set-cookie" not in refused.headers
    assert w.client.get("/me").status_code == 200


def test_refusal_is_logged_without_cookie_values(make_web, caplog):
    caplog.set_level(logging.DEBUG)
    w = make_web()
    w.login()
    secrets = [w.session_cookie(), w.client.cookies.get("__Host-tokensvc-csrf")]
    w.client.post("/act", headers={"origin": "https://evil.test"})
    [record] = [r for r in caplog.records if r.getMessage().startswith("csrf: refused")]
    message = record.getMessage()
    assert "origin_mismatch" in message and "https://evil.test" in message and "/act" in message
    assert record.levelno == logging.WARNING
    for secret in secrets:
        assert secret and secret not in caplog.text


def test_safe_methods_need_no_csrf_proof(make_web):
    w = make_web()
    w.login()
    for method in ("GET", "HEAD", "OPTIONS"):
        response = w.client.request(method, "/me", headers={"origin": "https://evil.test"})
        assert response.status_code in (200, 405), method
    assert w.refusals == []
