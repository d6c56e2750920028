"""ASGI middleware: every HTTP request gets its CSRF check and its verified session.

A plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``), so the context it sets
reaches the endpoint and works in Starlette, FastAPI or any ASGI app::

    backend = WebBackend(settings, target="tokensvc:50051", ca=..., cert=..., key=...)
    app = Starlette(routes=[...], middleware=[Middleware(TokenSessionMiddleware, backend=backend)])

Per request, in this order:

1. A state-changing request (not GET/HEAD/OPTIONS) must pass the CSRF checks
   (:mod:`tokensvc_client.web.csrf`), else 403 ``{"error": "csrf", "reason": ...}``.
   For a urlencoded form the body is read (up to ``max_form_bytes``) for the token and
   handed on to the app unchanged.
2. The session cookie is opened; one that does not open is no session (and is cleared).
   The ``Cookie`` header is read strictly (:func:`~tokensvc_client.web.cookies.
   parse_cookie_header`): a look-alike name planted by a sibling host is ignored, and a
   request carrying the session or CSRF cookie twice has none (nothing is cleared: the
   browser would then send only the other one).
   Such refusals are logged as warnings, at most one per reason per
   ``COOKIE_WARNING_INTERVAL`` seconds (with the number held back since), and every one is
   passed to the backend's audit hook (:class:`~tokensvc_client.web.cookies.CookieRefusal`:
   reason, cookie name, key id, method, path; never the value).
   The session is verified, refreshed when due (once per session), and made available to
   handlers (:func:`~tokensvc_client.web.context.current_session` ...).
3. A session that has ended (refresh refused: revoked, reused, expired) has its cookie
   cleared and is answered 401 ``{"error": "unauthenticated"}`` -- or a 303 redirect to
   ``login_url`` -- except on ``public_paths``, which go on as anonymous requests. A
   handler raising :class:`~tokensvc_client.web.context.NoSession` is answered the same.
   tokensvc unreachable with no valid token left: 503.
4. Cookies that the request caused (new session, refresh, logout, a new CSRF token) are
   added to the response's headers; a response that sets or clears the session cookie is
   ``Cache-Control: no-store`` (a shared cache must never hand it to someone else).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Literal

from tokensvc_client.web import context
from tokensvc_client.web.backend import WebBackend
from tokensvc_client.web.context import NoSession, RequestState
from tokensvc_client.web.cookies import (
    CookieReason,
    CookieRefusal,
    RequestCookies,
    parse_cookie_header,
)
from tokensvc_client.web.csrf import (
    SAFE_METHODS,
    CsrfReason,
    CsrfRefusal,
    check_request,
    form_field,
    needs_form,
    refusal,
)
from tokensvc_client.web.sealing import SealError

__all__ = ["TokenSessionMiddleware"]

log = logging.getLogger("tokensvc_client.web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


#: seconds between two warnings of one refused-cookie reason
COOKIE_WARNING_INTERVAL = 60.0


class _BodyTooLarge(Exception):
    pass


class Throttle:
    """At most one warning per key per ``interval`` seconds, counting those held back
    (so a flood of bad cookies cannot flood the log, and still shows in it).

    Keys are a small fixed set (the reasons), so memory is bounded."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """``None``: hold this one back; else log it, with the number held back since the
        previous one."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class TokenSessionMiddleware:
    """See the module docstring.

    Args:
        app: the ASGI app to protect.
        backend: the configured :class:`~tokensvc_client.web.backend.WebBackend`.
    """

    def __init__(self, app: App, backend: WebBackend) -> None:
        self.app = app
        self.backend = backend
        self.settings = backend.settings
        self.cookie_warnings = Throttle(COOKIE_WARNING_INTERVAL)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        method = str(scope["method"]).upper()
        path = str(scope.get("path", "/"))
        cookies = self._cookies(headers.get("cookie", ""), method, path)
        jar = self.backend.cookies
        csrf = jar.csrf(cookies)
        state = RequestState(csrf=csrf or jar.new_csrf())
        if csrf is None:
            state.cookie(jar.set_csrf(state.csrf))
        if method not in SAFE_METHODS:
            checked = await self._check_csrf(headers, csrf, method, path, receive, send)
            if checked is None:
                return  # answered: refused
            receive = checked
        outcome = await self._resolve(cookies, state, method, path)
        if outcome == "unavailable":
            await _json(send, 503, {"error": "unavailable"}, [])
            return
        if outcome == "ended" and not self.settings.is_public(path):
            await self._unauthenticated(send, state)
            return
        await self._call_app(scope, receive, send, state)

    async def _check_csrf(
        self,
        headers: dict[str, str],
        cookie_token: str | None,
        method: str,
        path: str,
        receive: Receive,
        send: Send,
    ) -> Receive | None:
        """The CSRF checks of a state-changing request: the ``receive`` to hand on (the
        body replayed if it was read for the form token), or ``None`` once refused."""
        submitted: str | None = None
        if needs_form(headers, self.settings):
            try:
                body = await _read_body(receive, self.settings.max_form_bytes)
            except _BodyTooLarge:
                await _json(send, 413, {"error": "request_too_large"}, [])
                return None
            submitted = form_field(body, self.settings.csrf_field)
            receive = _replay(body, receive)
        reason = check_request(headers, submitted, cookie_token, self.settings)
        if reason is not None:
            await self._refuse(send, reason, method, path, headers)
            return None
        return receive

    def _cookies(self, header: str, method: str, path: str) -> dict[str, str]:
        """The request's cookies; the session or CSRF cookie sent twice is refused."""
        parsed: RequestCookies = parse_cookie_header(header)
        for name in (self.settings.session_cookie, self.settings.csrf_cookie):
            if name in parsed.repeated:
                self._cookie_refused(CookieReason.REPEATED, name, "", method, path)
        return parsed.values

    async def _resolve(
        self, cookies: dict[str, str], state: RequestState, method: str, path: str
    ) -> Literal["ok", "ended", "unavailable"]:
        """Put the request's session (if any) into ``state``: ``"ok"``, ``"ended"`` (its
        cookie is cleared) or ``"unavailable"``."""
        jar = self.backend.cookies
        name = self.settings.session_cookie
        value = cookies.get(name)
        if value is None:
            return "ok"
        try:
            stored = jar.open_session(value) if value else None
        except SealError as err:
            self._cookie_refused(CookieReason(err.reason.value), name, err.key_id, method, path)
            stored = None
        if stored is None:
            state.cookie(jar.clear_session())  # unreadable: treated as none
            return "ok"
        outcome = await self.backend.resolve(stored, f"{method} {path}")
        if outcome.unavailable:
            return "unavailable"
        if outcome.ended:
            self.backend.end(state)
            return "ended"
        state.session = outcome.session
        if outcome.store is not None:
            state.cookie(jar.set_session(outcome.store, self.backend.now()))
        return "ok"

    async def _call_app(
        self, scope: Scope, receive: Receive, send: Send, state: RequestState
    ) -> None:
        """Run the app with ``state`` as the current request's, adding its cookies to the
        response; a ``NoSession`` out of the app is answered like an ended session."""
        started = False

        async def send_with_cookies(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if self.settings.session_cookie in state.set_cookies:
                    # a response carrying someone's session must never be stored by a cache
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = [*headers, *_cookie_headers(state.set_cookies.values())]
            await send(message)

        token = context.enter(state)
        try:
            await self.app(scope, receive, send_with_cookies)
        except NoSession:
            if started:
                raise
            await self._unauthenticated(send, state)
        finally:
            context.leave(token)

    async def _refuse(
        self, send: Send, reason: CsrfReason, method: str, path: str, headers: dict[str, str]
    ) -> None:
        record = refusal(reason, method, path, headers)
        log.warning(
            "csrf: refused %s %s: %s (origin=%r sec-fetch-site=%r)",
            record.method,
            record.path,
            record.reason.value,
            record.origin,
            record.fetch_site,
        )
        self._audit(record)
        await _json(send, 403, {"error": "csrf", "reason": reason.value}, [])

    def _cookie_refused(
        self, reason: CookieReason, cookie: str, key_id: str, method: str, path: str
    ) -> None:
        record = CookieRefusal(reason, cookie, key_id, method, path[:200])
        held = self.cookie_warnings.allow(reason.value)
        if held is not None:
            log.warning(
                "cookie refused: %s on %s %r: %s (key id %r)%s",
                record.cookie,
                record.method,
                record.path,
                record.reason.value,
                record.key_id,
                f"; {held} more since the last warning" if held else "",
            )
        self._audit(record)

    def _audit(self, record: CsrfRefusal | CookieRefusal) -> None:
        if self.backend.audit is not None:
            try:
                self.backend.audit(record)
            except Exception:
                log.exception("audit hook failed")

    async def _unauthenticated(self, send: Send, state: RequestState) -> None:
        cookies = _cookie_headers(state.set_cookies.values())
        if self.settings.login_url is not None:
            headers = [(b"location", self.settings.login_url.encode("latin-1")), *cookies]
            await _respond(send, 303, b"", b"text/plain; charset=utf-8", headers)
            return
        await _json(send, 401, {"error": "unauthenticated"}, cookies)


def _headers(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name; a repeated header keeps its first value (the
    CSRF checks read Origin, Sec-Fetch-Site and the custom header, never joined)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        key = name.decode("latin-1").lower()
        if key == "cookie" and key in found:
            found[key] += "; " + value.decode("latin-1")
        else:
            found.setdefault(key, value.decode("latin-1"))
    return found


def _cookie_headers(lines: Iterable[str]) -> list[tuple[bytes, bytes]]:
    return [(b"set-cookie", line.encode("latin-1")) for line in lines]


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that first hands the app the body already read."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _json(
    send: Send, status: int, body: dict[str, str], headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode("utf-8")
    await _respond(send, status, payload, b"application/json", headers)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"cache-control", b"no-store"),
                (b"x-content-type-options", b"nosniff"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
