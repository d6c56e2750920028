"""The JWK Set and a discovery document over HTTP, for verifiers that cannot call GetKeys
(sidecars such as Envoy's ``jwt_authn`` filter or Istio's ``RequestAuthentication``).

Off unless ``--http-listen HOST:PORT`` is set. HTTP parsing and responses are aiohttp's
low-level server (:class:`aiohttp.web.Server`: it runs inside the service's asyncio loop,
no ASGI layer or second process); this module adds the admission control a public listener
needs (:mod:`tokensvc.http.gate`) and the two documents:

* ``GET``/``HEAD`` of exactly these paths (a query string is ignored):

  - ``/.well-known/jwks.json``: the live key ring's JWK Set (``KeyRing.jwks_json``, read
    per request, so rotations show up without a restart) -- byte for byte what GetKeys
    returns, with ``Cache-Control: public, max-age=<--jwks-max-age>`` (GetKeys'
    ``max_age_seconds``).
  - ``/.well-known/openid-configuration``: ``issuer``, ``jwks_uri`` and
    ``id_token_signing_alg_values_supported: ["ES256"]``. ``jwks_uri`` is
    ``<issuer>/.well-known/jwks.json`` with the port this listener is bound to (unless the
    issuer names a port itself: behind a proxy, put its port in ``--issuer``); there is no
    separate public-URL setting.
    No ``token_endpoint``, ``authorization_endpoint`` etc.: the service has no OAuth HTTP
    endpoints (tokens are issued over gRPC only), so this is a key-discovery document for
    verifiers, not a complete OpenID Provider configuration. Same ``Cache-Control``.
  - any extra document the server registers (``/metrics``, see :mod:`tokensvc.observe.metrics`).

  Other paths answer 404; other methods 405 with ``Allow: GET, HEAD``.
* A strong ``ETag`` (SHA-256 of the body); ``If-None-Match`` (a list, ``W/`` tags compared
  weakly as RFC 9110 prescribes, or ``*``) answers 304 without a body.
* HTTP/1.1 (1.0 accepted), one request per connection (``Connection: close``), no request
  bodies (``Content-Length`` above 0 or any ``Transfer-Encoding``: 400), an HTTP/1.1
  request needs exactly one ``Host``. Limits (module constants): request line and each
  header line at most :data:`MAX_LINE` bytes, at most :data:`MAX_HEADERS` header lines
  (else 431); malformed requests get 400 with a fixed body, an unexpected error 500 --
  never a traceback or echoed input. Connection limits are :mod:`tokensvc.http.gate`'s.
* TLS: outside ``--insecure`` the listener serves HTTPS with the gRPC server's
  ``--tls-cert``/``--tls-key``, TLS 1.2 minimum, no client certificates (the keys are
  public; TLS protects their integrity). The files are loaded once at start-up: unlike the
  gRPC port (:mod:`tokensvc.security.tls`), a certificate rotation needs a restart. Plaintext HTTP
  only in ``--insecure`` mode, and then only on a loopback address.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from tokensvc.config import ConfigError, Settings
from tokensvc.http import gate

log = logging.getLogger("tokensvc.http_jwks")

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
#: Most bytes of the request line, and of each header line.
MAX_LINE = 8 * 1024
#: Most header lines in a request.
MAX_HEADERS = 32

_ENTITY_TAG = re.compile(r'\s*(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Server": "tokensvc"}
_DEFAULT_PORTS = {"https": 443, "http": 80}


class KeySource(Protocol):
    """What the listener needs of :class:`tokensvc.keys.ring.KeyRing`."""

    @property
    def jwks_json(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Document:
    """An extra resource on the listener: ``render`` returns its body and content type
    per request (no ETag: it changes every time, e.g. ``/metrics``)."""

    render: Callable[[], tuple[bytes, str]]


class _BadRequest(Exception):
    """The request cannot be served."""


def discovery_document(issuer: str, port: int = 0) -> dict[str, object]:
    """The discovery document served at :data:`DISCOVERY_PATH` (see the module doc).

    ``jwks_uri`` is the issuer URL with ``port``, the port the JWKS is served on, unless
    the issuer names a port itself (a proxy in front) or ``port`` is the scheme's default.
    """
    parts = urlsplit(issuer)
    netloc = parts.netloc
    if port and parts.port is None and port != _DEFAULT_PORTS.get(parts.scheme):
        netloc = f"{netloc}:{port}"
    base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return {
        "issuer": issuer,
        "jwks_uri": base + JWKS_PATH,
        "id_token_signing_alg_values_supported": ["ES256"],
    }


def etag_of(body: bytes) -> str:
    """The strong entity tag of a body: its SHA-256 in hex, quoted."""
    return '"' + hashlib.sha256(body).hexdigest() + '"'


def _none_match(values: list[str], etag: str) -> bool:
    """Whether ``If-None-Match`` (all its field lines) matches ``etag`` (weak comparison).

    Raises:
        _BadRequest: a field value that is neither ``*`` nor a list of entity tags.
    """
    opaque = etag[1:-1]
    for value in values:
        if value.strip() == "*":
            return True
        rest = value.strip()
        while rest:
            found = _ENTITY_TAG.match(rest)
            if found is None:
                raise _BadRequest("malformed If-None-Match")
            if found.group(1) == opaque:
                return True
            rest = rest[found.end() :].lstrip(" \t,")
    return False


def _check(request: web.BaseRequest) -> None:
    """Refuse what the parser accepts but this listener does not (see the module doc)."""
    if request.version not in ((1, 0), (1, 1)):
        raise _BadRequest("only HTTP/1.0 and HTTP/1.1")
    if request.version == (1, 1) and len(request.headers.getall("Host", [])) != 1:
        raise _BadRequest("HTTP/1.1 needs exactly one Host header")
    if "Transfer-Encoding" in request.headers or (request.content_length or 0) > 0:
        raise _BadRequest("request bodies are not accepted")


def _error(status: int, message: str, **headers: str) -> web.Response:
    response = web.Response(
        status=status,
        text=message + "\n",
        headers={**_COMMON_HEADERS, "Cache-Control": "no-store", **headers},
    )
    response.force_close()
    return response


class _Handler(gate.Handler):
    """aiohttp's connection handler with our error answers: fixed bodies, 431 for header
    limits, and hostile input logged in one line rather than with a traceback."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500:
            log.error("HTTP request failed", exc_info=exc)
            return _error(500, "internal error")
        too_big = isinstance(exc, LineTooLong) or "Too many headers" in str(exc)
        # the class only: the exception's text can quote request bytes (a bearer token)
        log.debug("malformed HTTP request from %s: %s", request.remote, type(exc).__name__)
        if too_big:
            return _error(431, "request line or headers too large")
        return _error(400, "malformed request")

    def log_exception(self, *args: Any, **kw: Any) -> None:
        log.debug(*args)  # handle_error above logs what matters


class _Server(gate.Server):
    handler_class = _Handler


@dataclass
class HttpJwks:
    """A started listener; ``port`` is the bound port (useful with ``HOST:0``)."""

    settings: Settings
    keys: KeySource | None  # None: no JWKS/discovery (the plain --metrics-listen)
    documents: dict[str, Document] = field(default_factory=dict)
    scheme: str = "https"
    gate: gate.Gate | None = None
    _discovery: bytes = b""
    _cached: tuple[str, bytes, str] = ("", b"", "")

    def _discovery_body(self) -> bytes:
        """Built on first use: it names the bound port, known once the listener runs."""
        if not self._discovery:
            document = discovery_document(self.settings.issuer, self.port)
            self._discovery = json.dumps(document, separators=(",", ":")).encode()
        return self._discovery

    @property
    def port(self) -> int:
        return self.gate.port if self.gate is not None else 0

    async def stop(self) -> None:
        """Stop accepting, drop the connections still open, wait until all is closed."""
        if self.gate is not None:
            await self.gate.stop()
            self.gate = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request (aiohttp calls this once the head is parsed)."""
        try:
            _check(request)
            response = self._respond(request)
        except _BadRequest as err:
            response = _error(400, str(err))
        response.force_close()  # one request per connection
        return response

    def _respond(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.raw_path
        document = self.documents.get(path)
        if path == JWKS_PATH and self.keys is not None:
            body, etag = self._jwks(self.keys)
        elif path == DISCOVERY_PATH and self.keys is not None:
            body = self._discovery_body()
            etag = etag_of(body)
        elif document is None:
            return _error(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return _error(405, "only GET and HEAD", Allow="GET, HEAD")
        if document is not None:
            body, content_type = document.render()
            headers = {**_COMMON_HEADERS, "Cache-Control": "no-store", "Content-Type": content_type}
            return web.Response(body=body, headers=headers)
        cache = f"public, max-age={self.settings.jwks_max_age}"
        headers = {**_COMMON_HEADERS, "ETag": etag, "Cache-Control": cache}
        if _none_match(request.headers.getall("If-None-Match", []), etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers, content_type="application/json")

    def _jwks(self, keys: KeySource) -> tuple[bytes, str]:
        """The live JWK Set and its ETag (recomputed only when the ring changed)."""
        text = keys.jwks_json
        if text is not self._cached[0]:
            body = text.encode()
            self._cached = (text, body, etag_of(body))
        return self._cached[1], self._cached[2]


def server_ssl_context(settings: Settings) -> ssl.SSLContext:
    """HTTPS with the service's certificate and key, TLS 1.2 or later, no client certs."""
    assert settings.tls_cert is not None and settings.tls_key is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"--http-listen: cannot load {settings.tls_cert} / {settings.tls_key}: {err}"
        ) from None
    return ctx


def metrics_on_public_port(settings: Settings) -> bool:
    """Whether ``/metrics`` is served on the public ``--http-listen`` port: only without
    ``--metrics-listen`` (the operator chose where the metrics go; the JWKS port, often
    open to the mesh, answers 404 for them) and with one worker (a scrape of the port the
    workers share reaches a random worker, whose counters would jump between the
    workers' values; see :mod:`tokensvc.runtime.workers`)."""
    return bool(settings.http_listen) and not settings.metrics_listen and settings.workers == 1


async def start_http(
    settings: Settings,
    keys: KeySource | None,
    documents: dict[str, Document] | None = None,
    listen: str | None = None,
    *,
    shared: bool | None = None,
) -> HttpJwks:
    """Start the listener on ``listen`` (default ``settings.http_listen``); HTTPS unless
    ``settings.insecure`` or ``keys`` is None (a plain-HTTP listener of ``documents`` only,
    e.g. ``/metrics`` on ``--metrics-listen``). ``documents`` adds resources. ``shared``:
    bind with ``SO_REUSEPORT`` (default: when there are several workers).

    Raises:
        ConfigError: no address, or unusable TLS files.
        OSError: the address cannot be bound.
    """
    address = listen or settings.http_listen
    if address is None:
        raise ConfigError("--http-listen is not set")
    # plaintext only in --insecure mode, which Settings.validate confines to loopback
    context = None if settings.insecure or keys is None else server_ssl_context(settings)
    http = HttpJwks(settings, keys, dict(documents or {}))
    http.scheme = "http" if context is None else "https"
    server = _Server(
        http.handle,
        max_line_size=MAX_LINE,
        max_field_size=MAX_LINE,
        max_headers=MAX_HEADERS,
        # aiohttp arms this at connect: a client that has not sent a whole request head
        # by then is dropped (slowloris); with one request per connection it is also the
        # header timeout
        keepalive_timeout=gate.READ_TIMEOUT,
        lingering_time=gate.LINGER_TIMEOUT,
        access_log=None,
    )
    http.gate = await gate.Gate.start(
        server, address, context, reuse_port=settings.workers > 1 if shared is None else shared
    )
    log.info(
        "HTTP listener (%s) on %s (%s)",
        http.scheme.upper(),
        address.rpartition(":")[0] + f":{http.port}",
        ", ".join([*([JWKS_PATH, DISCOVERY_PATH] if keys else []), *http.documents]),
    )
    return http
