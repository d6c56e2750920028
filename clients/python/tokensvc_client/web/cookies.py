"""The cookies of the web helper: the strict reading of the ``Cookie`` header, what the
session cookie holds and the exact ``Set-Cookie`` lines.

Every cookie is ``__Host-``-prefixed, ``Secure``, ``HttpOnly``, ``Path=/``, without
``Domain`` and ``SameSite=Strict`` (or ``Lax``): JavaScript in the page can neither read
nor write it, it never travels over plain HTTP, and no sibling host can set or shadow it.
The session cookie lives as long as the refresh token it holds -- never past the session's
absolute end -- and holds the token pair sealed (:mod:`tokensvc_client.web.sealing`).

**Reading the header strictly.** ``__Host-`` keeps a sibling host from setting a cookie of
*that name*, not one whose name merely looks like it: a sibling subdomain can set
``\xa0__Host-tokensvc-session=...; Domain=example.com`` (to the browser not a ``__Host-``
name), which the browser then sends after the real one. A lenient parser that strips
Unicode whitespace from names (Starlette's ``cookie_parser`` over a latin-1 decoded header)
reads both as the session cookie and keeps the last: the sibling's. So the helper parses
the header itself (:func:`parse_cookie_header`): split on ``;``, strip only space and tab,
names matched byte for byte, names that are not RFC 6265 tokens ignored; and a name sent
twice counts as not sent at all (:attr:`RequestCookies.repeated`), since no one can tell
which of the two the backend set.

**Refusals leave a trace.** A session cookie that does not open (tampered, truncated,
another key's, malformed) or a cookie name sent twice is a :class:`CookieRefusal`: the
middleware logs it (rate-limited) and hands it to the backend's audit hook, with the
reason and the key id the value names -- never the value.
"""

from __future__ import annotations

import enum
import json
import secrets
import string
from dataclasses import dataclass

from tokensvc_client.results import TokenPair
from tokensvc_client.web.refresh import StoredSession
from tokensvc_client.web.sealing import CookieSealer, SealError, SealFailure
from tokensvc_client.web.settings import WebSettings

__all__ = [
    "CookieJar",
    "CookieReason",
    "CookieRefusal",
    "RequestCookies",
    "parse_cookie_header",
]

_FORMAT = 1


class CookieReason(enum.StrEnum):
    """Why a cookie of the helper was not used (the ``reason`` logged and audited)."""

    #: not a sealed value of this format (or, sealed by us, not a session of this format)
    MALFORMED = SealFailure.MALFORMED.value
    #: sealed under a key this backend does not hold: dropped in a rotation, or another
    #: deployment's
    UNKNOWN_KEY = SealFailure.UNKNOWN_KEY.value
    #: the authentication tag fails: altered, truncated, or another cookie's value
    TAG_MISMATCH = SealFailure.TAG_MISMATCH.value
    #: the cookie's name twice in one request: which one the backend set cannot be told
    REPEATED = "repeated"


@dataclass(frozen=True, slots=True)
class CookieRefusal:
    """A cookie that was not used, as logged and audited: nothing secret in it.

    Attributes:
        reason: the stable reason code.
        cookie: the cookie's name.
        key_id: the key id the value names (public: a hash of a key), or ``""``.
        method / path: of the request (path cut to 200 characters).
    """

    reason: CookieReason
    cookie: str
    key_id: str
    method: str
    path: str


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


#: RFC 6265 cookie-name = RFC 7230 token
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


@dataclass(frozen=True, slots=True)
class RequestCookies:
    """The cookies of one request's ``Cookie`` header.

    Attributes:
        values: the value of every name sent exactly once.
        repeated: names sent more than once; they have no value here (a request carrying
            the session or CSRF cookie twice has neither).
    """

    values: dict[str, str]
    repeated: frozenset[str]


def parse_cookie_header(header: str) -> RequestCookies:
    """Read a ``Cookie`` header (decoded as latin-1, so one character per byte) strictly:
    pairs split on ``;``, space and tab stripped (nothing else), a pair without ``=`` or
    with a name that is not a token ignored, names compared exactly."""
    values: dict[str, str] = {}
    repeated: set[str] = set()
    for pair in header.split(";"):
        name, eq, value = pair.partition("=")
        name = name.strip(" \t")
        if not eq or not name or not _TOKEN_CHARS.issuperset(name):
            continue
        if name in values or name in repeated:
            values.pop(name, None)
            repeated.add(name)
            continue
        values[name] = value.strip(" \t")
    return RequestCookies(values, frozenset(repeated))


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
        try:
            return self.open_session(value)
        except SealError:
            return None

    def open_session(self, value: str) -> StoredSession:
        """The session sealed in a session cookie's ``value``.

        Raises:
            SealError: it does not open, or opens to no session of this format
                (``MALFORMED``).
        """
        raw = self._sealer.unseal(self._settings.session_cookie, value)
        stored = _from_json(raw)
        if stored is None:
            raise SealError(SealFailure.MALFORMED, value.partition(".")[0])
        return stored

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
