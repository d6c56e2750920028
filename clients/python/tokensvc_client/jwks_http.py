"""A pinned HTTPS JWKS URL as the key source of :class:`~tokensvc_client.jwks.JwksCache`.

The default source of a verifier's keys is GetKeys of the configured service; where only
the service's HTTP listener (``--http-listen``) is reachable, use::

    source = HttpsJwksSource("https://tokensvc.example:8443/.well-known/jwks.json", ca=CA)
    cache = JwksCache(source)                     # blocking
    cache = AsyncJwksCache(source.fetch_async)    # asyncio

The URL is fixed at construction; nothing in a token (``kid``, ``jku``, ``x5u`` ...) ever
selects where keys come from, and the cache's rules (max age, unknown-``kid`` refetch at
most once per ``min_refetch_interval``, last good set kept on failure) apply unchanged.

Each fetch is one ``GET`` with the standard library's :mod:`http.client`:

* ``https://`` only, verified against ``ca`` (a PEM bundle; without it the system trust
  store) with TLS 1.2 or later. ``http://`` only to ``127.0.0.1``, ``::1`` or
  ``localhost`` and only with ``allow_insecure_loopback=True`` (development).
* No redirects (a 3xx is a failure), at most ``max_bytes`` of body, ``Content-Type``
  ``application/json`` (or ``application/jwk-set+json``), a usable JWK Set.
* ``Cache-Control: max-age`` becomes :attr:`Jwks.max_age_seconds` (``no-cache`` or
  ``no-store``: 0; absent: ``max_age_default``; capped at :data:`MAX_AGE_CAP`).
* ``If-None-Match`` with the last ``ETag``; a 304 answers the previous key set again.
* ``timeout`` bounds the connection and each read.

Every failure raises :class:`~tokensvc_client.errors.KeysUnavailable`; the cache logs it
and keeps serving its last good key set.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import re
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from tokensvc_client.errors import KeysUnavailable
from tokensvc_client.results import Jwks
from tokensvc_client.verifier import KeySet

#: Default cap on the response body.
DEFAULT_MAX_BYTES = 64 * 1024
#: Longest cache lifetime taken from a response (a day).
MAX_AGE_CAP = 86400
_JSON_TYPES = frozenset({"application/json", "application/jwk-set+json"})
_MAX_AGE = re.compile(r'^\s*max-age\s*=\s*"?(\d+)"?\s*$', re.IGNORECASE)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def max_age_of(cache_control: str | None, default: int) -> int:
    """Seconds from a ``Cache-Control`` value (see the module doc)."""
    if cache_control is None:
        return default
    for directive in cache_control.split(","):
        if directive.strip().lower() in ("no-cache", "no-store"):
            return 0
    for directive in cache_control.split(","):
        found = _MAX_AGE.match(directive)
        if found:
            return min(int(found.group(1)), MAX_AGE_CAP)
    return default


class HttpsJwksSource:
    """Fetches the JWK Set from one pinned URL; call it (blocking) or await
    :meth:`fetch_async`. Thread-safe: fetches are serialised.

    Args:
        url: ``https://HOST[:PORT]/PATH`` of the JWK Set.
        ca: PEM CA bundle the server certificate must chain to; ``None``: system trust.
        timeout: seconds for connecting and for each read.
        max_age_default: cache lifetime when the response has no ``max-age``.
        allow_insecure_loopback: also accept ``http://`` to a loopback host (development).
        max_bytes: largest accepted body.

    Raises:
        ValueError: the URL is not acceptable (scheme, host, credentials, fragment).
    """

    def __init__(
        self,
        url: str,
        *,
        ca: str | Path | None = None,
        timeout: float = 5.0,
        max_age_default: int = 300,
        allow_insecure_loopback: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        parts = urlsplit(url)
        host = parts.hostname
        if not host or parts.username is not None or parts.password is not None:
            raise ValueError(f"JWKS URL needs a host and no credentials: {url!r}")
        if parts.fragment:
            raise ValueError(f"JWKS URL must not have a fragment: {url!r}")
        # an explicit port: http.client would read "::1" as host ":" port 1
        port = parts.port or (443 if parts.scheme == "https" else 80)  # ValueError if bad
        if parts.scheme == "https":
            self._context: ssl.SSLContext | None = ssl.create_default_context(
                cafile=None if ca is None else str(ca)
            )
            self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        elif parts.scheme == "http" and allow_insecure_loopback and _is_loopback(host):
            self._context = None
        else:
            raise ValueError(
                f"JWKS URL must be https:// (http:// only to a loopback host with "
                f"allow_insecure_loopback): {url!r}"
            )
        if timeout <= 0 or max_bytes <= 0 or max_age_default < 0:
            raise ValueError("timeout and max_bytes must be positive, max_age_default >= 0")
        self.url = url
        self._host = host
        self._port = port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = timeout
        self._max_age_default = max_age_default
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._etag: str | None = None
        self._last: str | None = None

    def __repr__(self) -> str:
        return f"HttpsJwksSource({self.url!r})"

    def __call__(self) -> Jwks:
        """Fetch (blocking).

        Raises:
            KeysUnavailable: on any failure; the message names the URL and the reason.
        """
        with self._lock:
            try:
                return self._fetch()
            except KeysUnavailable as err:
                raise KeysUnavailable(f"JWKS from {self.url}: {err}") from err
            except (OSError, http.client.HTTPException, ValueError) as err:
                raise KeysUnavailable(f"JWKS from {self.url}: {type(err).__name__}: {err}") from err

    async def fetch_async(self) -> Jwks:
        """Fetch without blocking the event loop (the blocking fetch, in a thread)."""
        return await asyncio.to_thread(self)

    def _connection(self) -> http.client.HTTPConnection:
        if self._context is None:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        return http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=self._context
        )

    def _fetch(self) -> Jwks:
        conn = self._connection()
        try:
            headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
            if self._etag is not None and self._last is not None:
                headers["If-None-Match"] = self._etag
            conn.request("GET", self._target, headers=headers)
            response = conn.getresponse()
            max_age = max_age_of(response.getheader("Cache-Control"), self._max_age_default)
            if response.status == 304:
                if self._last is None:
                    raise KeysUnavailable("304 Not Modified, but no key set was fetched before")
                return Jwks(self._last, max_age)
            if response.status != 200:
                raise KeysUnavailable(f"HTTP status {response.status} (redirects not followed)")
            media_type = (response.getheader("Content-Type") or "").split(";")[0]
            if media_type.strip().lower() not in _JSON_TYPES:
                raise KeysUnavailable(f"Content-Type {media_type!r} is not application/json")
            if response.getheader("Content-Encoding", "identity").lower() != "identity":
                raise KeysUnavailable("compressed responses are not accepted")
            length = response.getheader("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > self._max_bytes):
                raise KeysUnavailable(f"response larger than {self._max_bytes} bytes")
            body = response.read(self._max_bytes + 1)
            if len(body) > self._max_bytes:
                raise KeysUnavailable(f"response larger than {self._max_bytes} bytes")
            text = body.decode("utf-8")
            KeySet.from_jwks(text)  # refuse an unusable document before remembering it
            self._last, self._etag = text, response.getheader("ETag")
            return Jwks(text, max_age)
        finally:
            conn.close()
