"""The devices page and its JSON endpoints (ListSessions with the user's own token), sign
out everywhere, and calling a protected gRPC service with the session's credentials."""

from __future__ import annotations

import json
import re

import grpc
import grpc.aio
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.protected import Setup, start_server
from tests.web.conftest import GOOD, ORIGIN
from tokensvc_client import current_claims_or_none, web
from tokensvc_client.v1 import tokensvc_pb2 as pb

FORM = {"origin": ORIGIN, "content-type": "application/x-www-form-urlencoded"}


def _active(w, subject: str) -> set[str]:
    listed = w.server.stub().ListSessions(pb.ListSessionsRequest(subject=subject)).sessions
    return {s.session_id for s in listed if s.active}


def test_page_lists_the_sessions_with_this_device_marked(make_web):
    w = make_web()
    other = make_web(server=w.server)
    other_sid = other.login("alice", label="Phone <b>").json()["sid"]
    sid = w.login("alice", label="Laptop").json()["sid"]
    page = w.client.get("/devices")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    body = page.text
    assert '<html lang="en">' in body and "<caption>" in body and 'scope="col"' in body
    assert 'Laptop <span class="current">(this device)</span>' in body
    assert "Phone &lt;b&gt;" in body and "<b>" not in body  # labels are escaped
    assert body.count('<button type="submit"') == 3  # two revoke buttons, sign out everywhere
    assert f'value="{sid}"' in body and f'value="{other_sid}"' in body
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    assert body.count(f'name="csrf_token" value="{token}"') == 3
    assert re.search(r'aria-label="Revoke: Phone &lt;b&gt;"', body)


def test_revoke_button_revokes_that_session_only(make_web):
    w = make_web()
    other = make_web(server=w.server)
    other_sid = other.login("alice", label="Phone").json()["sid"]
    sid = w.login("alice").json()["sid"]
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    response = w.client.post(
        "/devices/revoke",
        content=f"session_id={other_sid}&csrf_token={token}",
        headers=FORM,
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/devices"
    assert _active(w, "alice") == {sid}
    assert (
        other.client.get("/me").status_code == 200
    )  # its token lives until its refresh (or the feed)
    assert other_sid not in w.client.get("/devices").text


def test_another_users_session_cannot_be_revoked(make_web):
    w = make_web()
    bob = make_web(server=w.server)
    bob_sid = bob.login("bob").json()["sid"]
    w.login("alice")
    gone = w.client.delete(f"/api/sessions/{bob_sid}", headers=GOOD)
    assert gone.status_code == 404
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    w.client.post(
        "/devices/revoke", content=f"session_id={bob_sid}&csrf_token={token}", headers=FORM
    )
    assert _active(w, "bob") == {bob_sid}


def test_revoking_this_device_logs_it_out(make_web):
    w = make_web(login_url="/login")
    sid = w.login("alice").json()["sid"]
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    response = w.client.post(
        "/devices/revoke",
        content=f"session_id={sid}&csrf_token={token}",
        headers=FORM,
        follow_redirects=False,
    )
    assert response.headers["location"] == "/login"
    assert w.session_cookie() is None
    assert _active(w, "alice") == set()


def test_sign_out_everywhere(make_web):
    w = make_web()
    other = make_web(server=w.server)
    other.login("alice")
    w.login("alice")
    first = w.login("alice").json()["sid"]
    w.login("alice")  # a new login in this browser ends the session it replaces
    active = _active(w, "alice")
    assert len(active) == 2 and first not in active
    refused = w.client.post("/devices/sign-out-everywhere", headers={"origin": "https://evil.test"})
    assert refused.status_code == 403 and _active(w, "alice") == active
    token = w.client.cookies.get("__Host-tokensvc-csrf")
    response = w.client.post(
        "/devices/sign-out-everywhere",
        content=f"csrf_token={token}",
        headers=FORM,
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert _active(w, "alice") == set() and w.session_cookie() is None


def test_json_endpoints(make_web):
    w = make_web()
    other = make_web(server=w.server)
    other_sid = other.login("alice", label="Phone").json()["sid"]
    sid = w.login("alice", label="Laptop").json()["sid"]
    listed = w.client.get("/api/sessions").json()["sessions"]
    assert {(s["session_id"], s["session_label"], s["current"]) for s in listed} == {
        (sid, "Laptop", True),
        (other_sid, "Phone", False),
    }
    assert all(s["client_id"] == "web" and s["created_at"] > 0 for s in listed)
    assert w.client.delete(f"/api/sessions/{other_sid}").status_code == 403  # no CSRF proof
    assert w.client.delete(f"/api/sessions/{other_sid}", headers=GOOD).status_code == 204
    assert _active(w, "alice") == {sid}
    assert w.client.delete("/api/sessions", headers=GOOD).status_code == 204
    assert _active(w, "alice") == set()
    assert w.client.get("/api/sessions").status_code == 401


def test_session_call_credentials_reach_a_protected_service(make_web):
    w = make_web()

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        claims = current_claims_or_none()
        return json.dumps({"sub": claims.subject if claims else None}).encode()

    handler = grpc.method_handlers_generic_handler(
        "demo.Profile", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    target, stop = start_server(w.server, "aio", Setup(handler=handler, fetches=[]))
    try:

        async def call(request: Request) -> JSONResponse:
            creds = grpc.composite_channel_credentials(
                grpc.local_channel_credentials(), web.session_call_credentials()
            )
            async with grpc.aio.secure_channel(target, creds) as channel:
                reply = await channel.unary_unary("/demo.Profile/WhoAmI")(b"", timeout=5)
            return JSONResponse(json.loads(reply))

        w.client.app.router.routes.append(Route("/call", call))
        w.login("alice")
        assert w.client.get("/call").json() == {"sub": "alice"}
    finally:
        stop()


POLICY = """
[rpc.Issue]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
[rpc.Revoke]
allow = ["spiffe://tokensvc.test/ns/auth/sa/login"]
"""


def test_over_mtls_the_backend_lists_with_the_users_own_token(make_web, mtls_service):
    # the backend's identity (login) may Issue and Revoke, and is no ListSessions admin
    svc = mtls_service(POLICY)
    login = svc.pki["login"]
    tls = {"ca": login.ca, "cert": login.cert, "key": login.key}
    w = make_web(server=svc.server, tls=tls)
    bob = make_web(server=svc.server, tls=tls)
    bob_sid = bob.login("bob").json()["sid"]
    sid = w.login("alice").json()["sid"]
    listed = w.client.get("/api/sessions").json()["sessions"]
    assert [s["session_id"] for s in listed] == [sid]
    # the same identity without the user's token is refused: no one else's listing
    with pytest.raises(grpc.RpcError) as refused:
        svc.stub("login").ListSessions(pb.ListSessionsRequest(subject="alice"))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert w.client.delete(f"/api/sessions/{bob_sid}", headers=GOOD).status_code == 404
    assert w.client.delete(f"/api/sessions/{sid}", headers=GOOD).status_code == 204
    assert bob.client.get("/api/sessions").status_code == 200


def test_the_page_with_revoke_buttons_cannot_be_framed(make_web):
    # clickjacking: a page of another origin (a sibling subdomain is same-site, so the
    # session cookie goes along even under SameSite=Strict) framing the devices page
    # could trick the user into "Sign out everywhere"; browsers refuse to frame it
    w = make_web()
    w.login("alice", label="Laptop")
    page = w.client.get("/devices")
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
