"""The cookies of the web helper: what the session cookie holds and the exact
``Set-Cookie`` lines.

Every cookie is ``__Host-``-prefixed, ``Secure``, ``HttpOnly``, ``Path=/``, without
``Domain`` and ``SameSite=Strict`` (or ``Lax``): JavaScript in the page can neither read
nor write it, it never travels over plain HTTP, and no sibling host can set or shadow it.
The session cookie lives as long as the refresh token it holds -- never past the session's
absolute end -- and holds the token pair sealed (:mod:`tokensvc_client.web.sealing`).
"""

from __future__ import annotations

import json
import secrets

from starlette.requests import cookie_parser

from tokensvc_client.results import TokenPair
from tokensvc_client.web.refresh import StoredSession
from tokensvc_client.web.sealing import CookieSealer
from tokensvc_client.web.settings import WebSettings

__all__ = ["CookieJar"]

_FORMAT = 1


def _to_json(stored: StoredSession) -> bytes:
    pair = stored.tokens
    return json.dumps(
        {
            "v": _FORMAT,
            "ra": stored.refresh_at,
            "a": pair.access_token,
            "r": pair.refresh_token,
            "ae": pair.access_expires_at,
            "re": pair.refresh_expires_at,
            "s": pair.session_id,
        },
        separators=(",", ":"),
    ).encode("utf-8")


def _from_json(raw: bytes) -> StoredSession | None:
    try:
        data = json.loads(raw)
        if data.get("v") != _FORMAT:
            return None
        pair = TokenPair(
            access_token=str(data["a"]),
            refresh_token=str(data["r"]),
            token_type="Bearer",
            access_expires_at=float(data["ae"]),
            refresh_expires_at=float(data["re"]),
            session_id=str(data["s"]),
        )
        return StoredSession(pair, float(data["ra"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # sealed by us, so only an older format ends here


def request_cookies(header: str) -> dict[str, str]:
    """The cookies of a ``Cookie`` header (Starlette's lenient parser, as browsers do)."""
    return cookie_parser(header)


class CookieJar:
    """Reads and writes the session and CSRF cookies of one backend."""

    def __init__(self, settings: WebSettings) -> None:
        self._settings = settings
        self._sealer = CookieSealer(settings.cookie_keys)

    def session(self, cookies: dict[str, str]) -> StoredSession | None:
        """The session in the session cookie; ``None`` without one or for one that does not
        open (tampered, another key's, another cookie's value)."""
        value = cookies.get(self._settings.session_cookie)
        if not value:
            return None
        raw = self._sealer.open(self._settings.session_cookie, value)
        return None if raw is None else _from_json(raw)

    def set_session(self, stored: StoredSession, now: float) -> str:
        """``Set-Cookie`` holding ``stored``, living as long as its refresh token (which
        tokensvc never lets outlive the session's absolute end)."""
        value = self._sealer.seal(self._settings.session_cookie, _to_json(stored))
        max_age = max(0, int(stored.tokens.refresh_expires_at - now))
        return self._line(self._settings.session_cookie, value, max_age)

    def clear_session(self) -> str:
        """``Set-Cookie`` removing the session cookie."""
        return self._line(self._settings.session_cookie, "", 0)

    def csrf(self, cookies: dict[str, str]) -> str | None:
        """The double-submit token of the CSRF cookie, if it looks like one of ours."""
        value = cookies.get(self._settings.csrf_cookie)
        return value if value and len(value) == 43 and value.isascii() else None

    @staticmethod
    def new_csrf() -> str:
        """A fresh double-submit token (256 bits, base64url)."""
        return secrets.token_urlsafe(32)

    def set_csrf(self, token: str) -> str:
        """``Set-Cookie`` for the CSRF token: a browser-session cookie (no Max-Age)."""
        return self._line(self._settings.csrf_cookie, token, None)

    def _line(self, name: str, value: str, max_age: int | None) -> str:
        parts = [f"{name}={value}"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        parts += ["Path=/", "Secure", "HttpOnly", f"SameSite={self._settings.same_site}"]
        return "; ".join(parts)
