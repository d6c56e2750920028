"""No sibling host can shadow the session or CSRF cookie.

A sibling subdomain can set ``\\xa0__Host-tokensvc-session=...; Domain=<parent>``: to the
browser the name is not a ``__Host-`` name, so it is stored and sent after the real one. The
helper reads the ``Cookie`` header strictly: that name is not ours (not even a token), and a
request carrying one of our names twice has no such cookie. The raw headers here are the
bytes a browser sends, handed to the app as they are (an httpx client would re-encode
them as UTF-8); tests/web/test_browser_sessions.py plants the same cookie in Chromium.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from tests.web.conftest import ORIGIN

S = "__Host-tokensvc-session"
C = "__Host-tokensvc-csrf"
FORM = {"origin": ORIGIN, "content-type": "application/x-www-form-urlencoded"}

#: (Cookie header with {real} = alice's cookie, {evil} = mallory's; whose session it is)
HOSTILE = [
    ("{S}={real}; \xa0{S}={evil}", "alice"),  # the sibling's cookie, sent after the real one
    ("{S}={real}; \x85{S}={evil}", "alice"),  # NEL: str.strip() strips it too
    ("\xa0{S}={evil}; {S}={real}", "alice"),
    ("{S}={real}; \xa0{S}={evil}; \x85{S}={evil}", "alice"),
    ("{S}={real}; \x0b{S}={evil}", "alice"),  # vertical tab: not stripped, not a token
    ("{S}={real}; {S}\xa0={evil}", "alice"),
    ("{S}={real}; {S}\x00={evil}", "alice"),
    ('{S}={real}; "{S}"={evil}', "alice"),
    ("{S}={real}; {S}", "alice"),  # no '=': not a pair
    (" \t{S}\t= {real} ;x=1", "alice"),  # space and tab around name and value: stripped
    ("\xa0{S}={evil}", None),  # only the look-alike: no session
    ("__host-tokensvc-session={evil}", None),  # names match exactly, case included
    ("{S}={real}; {S}={evil}", None),  # our name twice: neither
    ("{S}={evil};{S}={real}", None),
    ("{S}={real}; x=1; {S}={real}", None),
]


@dataclass
class Answer:
    status_code: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def set_cookies(self) -> list[str]:
        return [v for k, v in self.headers if k == "set-cookie"]


def raw(w, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> Answer:
    """One request with exactly these header bytes (latin-1), on the test client's loop."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "server": ("testserver", 443),
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await w.client.app(scope, receive, send)

    w.client.portal.call(call)
    start = sent[0]
    return Answer(
        start["status"],
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in start["headers"]],
        b"".join(m.get("body", b"") for m in sent[1:]),
    )


@pytest.fixture
def two_sessions(make_web):
    """alice's app (``w``) and mallory's session cookie under the same key and tokensvc."""
    w = make_web()
    mallory = make_web(server=w.server)
    mallory.login("mallory")
    w.login("alice")
    real, evil = w.session_cookie(), mallory.session_cookie()
    assert real and evil and real != evil
    return w, real, evil


def _get_me(w, *cookie_headers: str) -> Answer:
    return raw(w, "GET", "/me", [("cookie", h) for h in cookie_headers])


@pytest.mark.parametrize(("header", "subject"), HOSTILE)
def test_a_look_alike_or_repeated_session_cookie_is_not_the_session(two_sessions, header, subject):
    w, real, evil = two_sessions
    response = _get_me(w, header.format(S=S, real=real, evil=evil))
    if subject is None:
        assert response.status_code == 401
    else:
        assert response.status_code == 200 and response.json()["sub"] == subject
    # the real cookie is never cleared because of a planted one: the browser would then
    # send only the planted one
    cleared = [c for c in response.set_cookies() if c.startswith(f"{S}=;")]
    assert cleared == []


def test_a_look_alike_in_a_second_cookie_header_is_ignored(two_sessions):
    w, real, evil = two_sessions  # HTTP/2 sends cookies as separate header fields
    response = _get_me(w, f"{S}={real}", f"\xa0{S}={evil}")
    assert response.status_code == 200 and response.json()["sub"] == "alice"
    assert _get_me(w, f"{S}={real}", f"{S}={evil}").status_code == 401


@pytest.mark.parametrize("planted", ["\xa0{C}={chosen}", "\x85{C}={chosen}", "{C}={chosen}"])
def test_the_attacker_cannot_choose_the_double_submit_token(two_sessions, planted):
    w, real, _ = two_sessions
    token = "A" * 43  # looks like one of ours
    header = f"{S}={real}; {C}=" + "B" * 43 + "; " + planted.format(C=C, chosen=token)
    response = raw(
        w, "POST", "/act", [*FORM.items(), ("cookie", header)], f"csrf_token={token}".encode()
    )
    assert response.status_code == 403
    assert response.json() == {"error": "csrf", "reason": "csrf_token_mismatch"}
    assert w.acts == []


def test_the_real_double_submit_token_still_works_beside_a_look_alike(two_sessions):
    w, real, _ = two_sessions
    token = "B" * 43
    header = f"{S}={real}; {C}={token}; \xa0{C}=" + "A" * 43
    response = raw(
        w, "POST", "/act", [*FORM.items(), ("cookie", header)], f"csrf_token={token}".encode()
    )
    assert response.status_code == 200 and w.acts == ["alice"]


def test_parse_cookie_header():
    from tokensvc_client.web.cookies import parse_cookie_header

    parsed = parse_cookie_header("a=1; b=2;\tc = 3 ; a=4; \xa0d=5; e; f=x=y; =7; b=2")
    assert parsed.values == {"c": "3", "f": "x=y"}
    assert parsed.repeated == {"a", "b"}
    assert parse_cookie_header("").values == {}
