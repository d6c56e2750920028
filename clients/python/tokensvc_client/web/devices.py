"""The "your devices" page and its JSON twin, from ListSessions; plus logout.

:func:`session_routes` returns Starlette routes to mount in the app (behind
:class:`~tokensvc_client.web.middleware.TokenSessionMiddleware`, which makes every POST
and DELETE pass the CSRF checks):

========================================  ===================================================
``GET  /devices``                          server-rendered page: one row per session (device
                                           label, client, created, last active, "this
                                           device"), a revoke button each, "sign out
                                           everywhere"; plain HTML forms, no JavaScript
``POST /devices/revoke``                   form ``session_id``: revoke one of the user's sessions
``POST /devices/sign-out-everywhere``      revoke every session of the user
``POST /logout``                           revoke this session
``GET  /api/sessions``                     the sessions as JSON
``DELETE /api/sessions/{session_id}``      revoke one (204; 404 if not the user's)
``DELETE /api/sessions``                   sign out everywhere (204)
========================================  ===================================================

After the form posts the browser is sent (303) back to the page, or -- once its own
session is gone -- to ``login_url`` (or ``/``). Only the user's own sessions can be
revoked: a session id that ListSessions does not show for the user is left alone.

A session that tokensvc refuses on one of these calls (revoked elsewhere while its access
token is still valid here) is signed out: its cookie is cleared and the pages answer like
any ended session (303 to ``login_url``, else 401); the JSON endpoints always answer 401
``{"error": "unauthenticated"}``, as they do for an anonymous request.
"""

from __future__ import annotations

import functools
import html
import time
from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tokensvc_client.results import SessionInfo
from tokensvc_client.web.backend import WebBackend
from tokensvc_client.web.context import (
    NoSession,
    csrf_token,
    current_session,
    current_session_or_none,
)
from tokensvc_client.web.csrf import form_field

__all__ = ["render_devices", "session_routes"]


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _datetime(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;color:#111;background:#fff;margin:2rem;max-width:60rem}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.5rem;border-bottom:1px solid #555}
button{font:inherit;padding:.3rem .8rem;color:#fff;background:#0b3d91;
border:2px solid #0b3d91;border-radius:4px;cursor:pointer}
button:focus{outline:3px solid #c60;outline-offset:2px}
button.danger{background:#8b0000;border-color:#8b0000}
.current{font-weight:bold}
.visually-hidden{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
"""


def _row(session: SessionInfo, current_sid: str, csrf: str) -> str:
    label = session.session_label or "Unnamed device"
    this = session.session_id == current_sid
    marker = ' <span class="current">(this device)</span>' if this else ""
    action = "Sign out this device" if this else "Revoke"
    return f"""<tr{' aria-current="true"' if this else ""}>
<td>{html.escape(label)}{marker}</td>
<td>{html.escape(session.client_id)}</td>
<td><time datetime="{_datetime(session.created_at)}">{_when(session.created_at)}</time></td>
<td><time datetime="{_datetime(session.last_refreshed_at)}">\
{_when(session.last_refreshed_at)}</time></td>
<td><form method="post" action="/devices/revoke">
<input type="hidden" name="csrf_token" value="{html.escape(csrf)}">
<input type="hidden" name="session_id" value="{html.escape(session.session_id)}">
<button type="submit" aria-label="{action}: {html.escape(label)}">{action}</button>
</form></td>
</tr>"""


def render_devices(sessions: Sequence[SessionInfo], current_sid: str, csrf: str) -> str:
    """The devices page (accessible markup: landmarks, a captioned table with header
    cells, buttons named after their device, visible focus, high contrast)."""
    rows = "\n".join(_row(s, current_sid, csrf) for s in sessions if s.active)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Your devices</title><style>{_STYLE}</style></head>
<body><main>
<h1>Your devices</h1>
<table>
<caption>Devices signed in to your account</caption>
<thead><tr><th scope="col">Device</th><th scope="col">Client</th>\
<th scope="col">Signed in</th><th scope="col">Last active</th>\
<th scope="col"><span class="visually-hidden">Action</span></th></tr></thead>
<tbody>
{rows}
</tbody></table>
<form method="post" action="/devices/sign-out-everywhere">
<input type="hidden" name="csrf_token" value="{html.escape(csrf)}">
<p><button type="submit" class="danger">Sign out everywhere</button></p>
</form>
</main></body></html>
"""


#: Every answer: a browser never guesses another type for it (``text/html`` from JSON).
_API_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}


def _page_headers(origins: Sequence[str]) -> dict[str, str]:
    """Headers of the devices page. Its buttons revoke sessions: no other page may frame
    it (clickjacking -- a same-site page, e.g. a sibling subdomain, would get the session
    cookie sent along). The policy allows what the page uses, its inline style and forms
    posting to this backend (and the redirect after, possibly to another own origin);
    nothing else loads or runs. ``same-origin`` referrers: ``no-referrer`` would make
    browsers send ``Origin: null`` with the form posts, which the CSRF check refuses."""
    policy = (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        f"form-action 'self' {' '.join(origins)}; frame-ancestors 'none'"
    )
    return {
        **_API_HEADERS,
        "x-frame-options": "DENY",
        "content-security-policy": policy,
        "referrer-policy": "same-origin",
    }


Endpoint = Callable[[Request], Awaitable[Response]]


def _json_api(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` answering 401 JSON without a session (rather than a redirect meant for
    pages); the middleware adds the cleared cookie of a session that just ended."""

    @functools.wraps(endpoint)
    async def answered(request: Request) -> Response:
        try:
            return await endpoint(request)
        except NoSession:
            body = {"error": "unauthenticated"}
            return JSONResponse(body, status_code=401, headers=_API_HEADERS)

    return answered


def _as_json(session: SessionInfo, current_sid: str) -> dict[str, object]:
    return {
        "session_id": session.session_id,
        "client_id": session.client_id,
        "session_label": session.session_label,
        "created_at": session.created_at,
        "last_refreshed_at": session.last_refreshed_at,
        "expires_at": session.expires_at,
        "current": session.session_id == current_sid,
    }


def session_routes(backend: WebBackend) -> list[Route]:
    """The devices page, its JSON endpoints and logout, for ``backend``."""
    after_logout = backend.settings.login_url or "/"
    page_headers = _page_headers(backend.settings.origins)

    def back(to_page: bool) -> Response:
        # still signed in: back to the page; else wherever signed-out users go
        target = "/devices" if to_page and current_session_or_none() else after_logout
        return RedirectResponse(target, status_code=303)

    async def page(request: Request) -> Response:
        session = current_session()
        sessions = await backend.sessions()
        body = render_devices(sessions, session.session_id, csrf_token())
        return HTMLResponse(body, headers=page_headers)

    async def revoke(request: Request) -> Response:
        current_session()
        session_id = form_field(await request.body(), "session_id")
        if session_id:
            await backend.revoke_session(session_id)
        return back(True)

    async def everywhere(request: Request) -> Response:
        await backend.logout_everywhere()
        return back(False)

    async def logout(request: Request) -> Response:
        await backend.logout()
        return back(False)

    async def api_list(request: Request) -> Response:
        session = current_session()
        sessions = await backend.sessions()
        listed = [_as_json(s, session.session_id) for s in sessions if s.active]
        return JSONResponse({"sessions": listed}, headers=_API_HEADERS)

    async def api_revoke(request: Request) -> Response:
        current_session()
        found = await backend.revoke_session(str(request.path_params["session_id"]))
        return Response(status_code=204 if found else 404, headers=_API_HEADERS)

    async def api_everywhere(request: Request) -> Response:
        await backend.logout_everywhere()
        return Response(status_code=204, headers=_API_HEADERS)

    return [
        Route("/devices", page, methods=["GET"]),
        Route("/devices/revoke", revoke, methods=["POST"]),
        Route("/devices/sign-out-everywhere", everywhere, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/api/sessions", _json_api(api_list), methods=["GET"]),
        Route("/api/sessions", _json_api(api_everywhere), methods=["DELETE"]),
        Route("/api/sessions/{session_id}", _json_api(api_revoke), methods=["DELETE"]),
    ]
