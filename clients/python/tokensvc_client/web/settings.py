"""Configuration of the web helper, validated once when the backend is built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from tokensvc_client.web.sealing import CookieSealer

__all__ = ["WebSettings"]

SESSION_COOKIE = "__Host-tokensvc-session"
CSRF_COOKIE = "__Host-tokensvc-csrf"
CSRF_HEADER = "x-tokensvc-csrf"
CSRF_FIELD = "csrf_token"


def _origin(text: str) -> str:
    """``scheme://host[:port]`` of an own origin, normalised (lower case, no path)."""
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"origin {text!r}: must be https://host[:port] (cookies are Secure)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"origin {text!r}: only scheme, host and port")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port not in (None, 443) else ""
    return f"https://{host}{port}"


def same_origin_target(setting: str, target: str, origins: Sequence[str]) -> str:
    r"""``target`` if a browser sent there stays on this backend, else ``ValueError``
    naming ``setting``.

    Accepted: a path starting with a single ``/`` (not ``//`` nor ``/\``, which browsers
    read as another host), or an absolute ``https`` URL whose origin is one of
    ``origins``. Whitespace, control characters and backslashes are refused anywhere:
    browsers drop tabs and newlines and read ``\`` as ``/``, turning ``/<TAB>/evil`` or
    ``/\evil`` into ``//evil`` (an open redirect).
    """
    problem = f"{setting} {target!r}: must be a path here ('/login') or a URL of origins"
    if any(c <= " " or c in "\\\x7f" or not c.isascii() for c in target):
        raise ValueError(problem)
    if target.startswith("/"):
        if target.startswith("//"):
            raise ValueError(problem)
        return target
    parts = urlsplit(target)
    try:
        origin = _origin(f"{parts.scheme}://{parts.netloc}")
    except ValueError:
        raise ValueError(problem) from None
    if origin not in {_origin(o) for o in origins}:
        raise ValueError(problem)
    return target


@dataclass(frozen=True, slots=True)
class WebSettings:
    """What the web backend needs to know.

    Attributes:
        origins: the backend's own origins (``https://app.example.com``); a state-changing
            request must come from one of them (``Origin``/``Sec-Fetch-Site``).
        cookie_keys: 32-byte keys sealing the cookies, the current one first (rotation:
            see :mod:`tokensvc_client.web.sealing`).
        issuer: the ``iss`` tokensvc signs with.
        audience: the audience this backend verifies (put in every token it issues).
        extra_audience: further audiences of the tokens it issues: the mesh services the
            backend calls on the user's behalf and tokensvc's own audience
            (``--self-audience``, default ``tokensvc``), which the self-service
            ListSessions of the devices page requires.
        client_id: the ``client_id`` of the sessions (shown on the devices page).
        same_site: ``"Strict"`` (default) or ``"Lax"`` (links from other sites arrive
            logged in); the CSRF defence is the same for both.
        refresh_margin: refresh an access token this many seconds before it expires (at
            most half its lifetime).
        login_url: where a browser goes when its session has ended; ``None`` answers 401.
            A path on this backend (``/login``) or a URL of one of ``origins``, never
            another site (see :func:`same_origin_target`).
        public_paths: paths (exact, or prefixes ending in "/") that keep working with an
            ended session, as anonymous requests (the login page, static files).
        spent_token_memory: seconds a refreshed session's new pair is handed to requests
            that still carry the previous cookie (requests in flight, other tabs).
        max_form_bytes: largest form body read for the double-submit token.
    """

    origins: tuple[str, ...]
    cookie_keys: tuple[bytes, ...] = field(repr=False)
    issuer: str
    audience: str
    extra_audience: tuple[str, ...] = ()
    client_id: str = "web"
    same_site: Literal["Strict", "Lax"] = "Strict"
    refresh_margin: float = 60.0
    login_url: str | None = None
    public_paths: tuple[str, ...] = ()
    spent_token_memory: float = 60.0
    max_form_bytes: int = 64 * 1024
    session_cookie: str = SESSION_COOKIE
    csrf_cookie: str = CSRF_COOKIE
    csrf_header: str = CSRF_HEADER
    csrf_field: str = CSRF_FIELD

    @classmethod
    def create(
        cls,
        *,
        origins: Sequence[str],
        cookie_keys: Sequence[bytes],
        issuer: str,
        audience: str,
        extra_audience: Sequence[str] = (),
        public_paths: Sequence[str] = (),
        **options: object,
    ) -> WebSettings:
        """Build and validate settings from plain sequences.

        Raises:
            ValueError: a setting that cannot be right (see :meth:`validate`).
        """
        settings = cls(
            origins=tuple(_origin(o) for o in origins),
            cookie_keys=tuple(cookie_keys),
            issuer=issuer,
            audience=audience,
            extra_audience=tuple(extra_audience),
            public_paths=tuple(public_paths),
            **options,  # type: ignore[arg-type]
        )
        return settings.validate()

    def validate(self) -> WebSettings:
        """Raise ``ValueError`` for a setting that cannot be right; return ``self``."""
        if not self.origins:
            raise ValueError("origins: at least the backend's own origin")
        CookieSealer(self.cookie_keys)  # raises for a missing, short or repeated key
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience are required")
        if self.same_site not in ("Strict", "Lax"):
            raise ValueError('same_site must be "Strict" or "Lax" ("None" has no CSRF defence)')
        for name in (self.session_cookie, self.csrf_cookie):
            # __Host-: the browser refuses it unless Secure, Path=/ and no Domain, so a
            # sibling subdomain cannot plant or shadow it.
            if not name.startswith("__Host-") or not name[7:].replace("-", "").isalnum():
                raise ValueError(f"cookie name {name!r}: must be __Host- + letters/digits/-")
        if self.session_cookie == self.csrf_cookie:
            raise ValueError("the session and CSRF cookies need different names")
        if not self.csrf_header.replace("-", "").isalnum():
            raise ValueError("csrf_header: letters, digits and '-'")
        if self.refresh_margin < 0 or self.spent_token_memory < 0 or self.max_form_bytes < 1:
            raise ValueError("refresh_margin, spent_token_memory, max_form_bytes: not negative")
        if any(not p.startswith("/") for p in self.public_paths):
            raise ValueError("public_paths must start with '/'")
        if self.login_url is not None:
            same_origin_target("login_url", self.login_url, self.origins)
        return self

    def is_public(self, path: str) -> bool:
        """Whether ``path`` keeps working as anonymous once its session ended."""
        return any(path.startswith(p) if p.endswith("/") else path == p for p in self.public_paths)
