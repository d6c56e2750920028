"""Refresh: once per session however many requests arrive at expiry; an ended session is
401 (or a redirect) with its cookies cleared. Counted at the real tokensvc (its audit)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.web.conftest import GOOD
from tokensvc_client import RevocationFeed, channel
from tokensvc_client.v1 import tokensvc_pb2 as pb

SESSION = "__Host-tokensvc-session"
CLEARED = f"{SESSION}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict"
TTL = 2


def test_twenty_concurrent_requests_at_expiry_refresh_once(make_web):
    w = make_web(access_ttl=TTL)
    w.login()
    first_jti = w.client.get("/me").json()["jti"]
    old_cookie = w.session_cookie()
    w.wait_until_expired()
    assert w.audit.count("refreshed") == 0

    # 20 requests (tabs, parallel fetches) all carrying the expired session's cookie
    def get(_: int):
        return w.client.get("/me", headers={"cookie": f"{SESSION}={old_cookie}"})

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(get, range(20)))
    assert [r.status_code for r in responses] == [200] * 20
    jtis = {r.json()["jti"] for r in responses}
    assert len(jtis) == 1 and first_jti not in jtis  # all got the one new token
    assert all(
        any(c.startswith(f"{SESSION}=") for c in r.headers.get_list("set-cookie"))
        for r in responses
    )
    assert w.audit.count("refreshed") == 1
    assert w.audit.count("reuse_detected") == 0
    assert all(r.headers["cache-control"] == "no-store" for r in responses)

    # a late request with the old cookie gets the new pair, not a second Refresh (reuse)
    late = w.client.get("/me", headers={"cookie": f"{SESSION}={old_cookie}"})
    assert late.status_code == 200 and late.json()["jti"] in jtis
    assert w.audit.count("refreshed") == 1
    # and the session lives on at tokensvc
    [listed] = w.server.stub().ListSessions(pb.ListSessionsRequest(subject="alice")).sessions
    assert listed.active


def test_the_page_keeps_working_across_expiries(make_web):
    w = make_web(access_ttl=1)
    w.login()
    seen = set()
    for _ in range(2):
        response = w.client.get("/me")
        assert response.status_code == 200
        seen.add(response.json()["jti"])
        w.wait_until_expired()
    assert w.client.get("/me").status_code == 200
    assert len(seen) == 2 and w.audit.count("refreshed") == 2


def test_revoked_session_is_401_and_cookies_cleared(make_web):
    w = make_web(access_ttl=TTL)
    sid = w.login().json()["sid"]
    w.server.stub().Revoke(pb.RevokeRequest(session_id=sid))
    w.wait_until_due()
    response = w.client.get("/me")
    assert response.status_code == 401
    assert response.json() == {"error": "unauthenticated"}
    assert CLEARED in response.headers.get_list("set-cookie")
    assert w.session_cookie() is None
    assert w.client.get("/me").status_code == 401  # anonymous from now on


def test_ended_session_redirects_to_login_when_configured(make_web):
    w = make_web(access_ttl=TTL, login_url="/login", public_paths=["/public"])
    sid = w.login().json()["sid"]
    w.server.stub().Revoke(pb.RevokeRequest(session_id=sid))
    w.wait_until_due()
    cookie = w.session_cookie()
    response = w.client.get("/me", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login"
    assert CLEARED in response.headers.get_list("set-cookie")
    # a public path goes on as an anonymous request (and clears the dead cookie too)
    public = w.client.get("/public", headers={"cookie": f"{SESSION}={cookie}"})
    assert public.status_code == 200 and public.json()["anonymous"] is True
    assert CLEARED in public.headers.get_list("set-cookie")
    # an anonymous request to a protected handler: the same redirect
    assert w.client.get("/me", follow_redirects=False).headers["location"] == "/login"


def test_reused_refresh_token_ends_the_session(make_web):
    w = make_web(access_ttl=TTL)
    w.login()
    stored = w.backend.cookies.session({SESSION: w.session_cookie()})
    # someone else spent the refresh token (a stolen copy): the next refresh is reuse
    w.server.stub().Refresh(pb.RefreshRequest(refresh_token=stored.tokens.refresh_token))
    w.wait_until_due()
    response = w.client.get("/me")
    assert response.status_code == 401 and CLEARED in response.headers.get_list("set-cookie")


def test_tokensvc_down_keeps_a_valid_token_and_never_clears(make_web):
    w = make_web(access_ttl=TTL)
    w.login()
    w.wait_until_due()  # due, not yet expired
    w.server.stop()
    still = w.client.get("/me")
    assert still.status_code == 200  # the current token is valid: keep serving
    w.wait_until_expired()
    down = w.client.get("/me", headers=GOOD)
    assert down.status_code == 503
    assert not any(c.startswith(f"{SESSION}=") for c in down.headers.get_list("set-cookie"))


def test_with_the_revocation_feed_a_revoked_session_ends_at_once(make_web, tokensvc):
    feed = RevocationFeed(channel(tokensvc.target, insecure=True)).start()
    try:
        assert feed.wait_connected(5)
        w = make_web(server=tokensvc, revocation_check=feed)  # 15-minute access tokens
        sid = w.login().json()["sid"]
        assert w.client.get("/me").status_code == 200
        w.server.stub().Revoke(pb.RevokeRequest(session_id=sid))
        deadline = time.monotonic() + 2  # the feed delivers within milliseconds
        while (response := w.client.get("/me")).status_code == 200:
            assert time.monotonic() < deadline, "revocation not seen through the feed"
            time.sleep(0.02)
        assert response.status_code == 401 and CLEARED in response.headers.get_list("set-cookie")
    finally:
        feed.close()


def _refresh_token_set(w, response) -> str:
    """The refresh token inside the session cookie that ``response`` sets."""
    [line] = [c for c in response.headers.get_list("set-cookie") if c.startswith(f"{SESSION}=")]
    value = line.split(";", 1)[0].split("=", 1)[1]
    return w.backend.cookies.session({SESSION: value}).tokens.refresh_token


def _replicas(make_web, make_settings, start_server, grace: int):
    """Two processes of one web backend (same cookie key, each its own single flight)."""
    server = start_server(
        make_settings(access_ttl=TTL, refresh_grace_seconds=grace, audit_log_all=True)
    )
    return make_web(server=server), make_web(server=server)


def test_two_replicas_refreshing_one_session_converge_in_the_grace_window(
    make_web, make_settings, start_server
):
    a, b = _replicas(make_web, make_settings, start_server, grace=5)
    sid = a.login().json()["sid"]
    cookie = a.session_cookie()
    a.wait_until_due()
    # both replicas receive a request with the same due cookie: each refreshes it
    first = a.client.get("/me", headers={"cookie": f"{SESSION}={cookie}"})
    second = b.client.get("/me", headers={"cookie": f"{SESSION}={cookie}"})
    assert first.status_code == second.status_code == 200
    # the same successor refresh token (each with its own fresh access token): one lineage
    assert _refresh_token_set(a, first) == _refresh_token_set(b, second)
    assert a.audit.count("refresh_replayed") == 1
    assert a.audit.count("reuse_detected") == 0
    listed = a.server.stub().ListSessions(pb.ListSessionsRequest(subject="alice")).sessions
    assert [s.session_id for s in listed if s.active] == [sid]


def test_without_a_grace_window_the_second_replica_ends_the_session(
    make_web, make_settings, start_server
):
    a, b = _replicas(make_web, make_settings, start_server, grace=0)
    a.login()
    cookie = a.session_cookie()
    a.wait_until_due()
    assert a.client.get("/me", headers={"cookie": f"{SESSION}={cookie}"}).status_code == 200
    lost = b.client.get("/me", headers={"cookie": f"{SESSION}={cookie}"})
    assert lost.status_code == 401  # reuse: tokensvc revoked the family (strict mode)
    assert a.audit.count("reuse_detected") == 1
