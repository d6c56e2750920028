"""The JWK Set and a discovery document over HTTP, for verifiers that cannot call GetKeys
(sidecars such as Envoy's ``jwt_authn`` filter or Istio's ``RequestAuthentication``).

Off unless ``--http-listen HOST:PORT`` is set. Built on ``asyncio.start_server`` only (no
dependency), deliberately tiny:

* ``GET``/``HEAD`` of exactly two paths (a query string is ignored):

  - ``/.well-known/jwks.json``: the live key ring's JWK Set (``KeyRing.jwks_json``, read
    per request, so rotations show up without a restart) -- byte for byte what GetKeys
    returns, with ``Cache-Control: public, max-age=<--jwks-max-age>`` (GetKeys'
    ``max_age_seconds``).
  - ``/.well-known/openid-configuration``: ``issuer``, ``jwks_uri`` and
    ``id_token_signing_alg_values_supported: ["ES256"]``. ``jwks_uri`` is
    ``<issuer>/.well-known/jwks.json``: the issuer URL is taken to be where this listener
    is reachable (directly or behind a proxy); there is no separate public-URL setting.
    No ``token_endpoint``, ``authorization_endpoint`` etc.: the service has no OAuth HTTP
    endpoints (tokens are issued over gRPC only), so this is a key-discovery document for
    verifiers, not a complete OpenID Provider configuration. Same ``Cache-Control``.

  Other paths answer 404; other methods 405 with ``Allow: GET, HEAD``.
* A strong ``ETag`` (SHA-256 of the body); ``If-None-Match`` (a list, ``W/`` tags compared
  weakly as RFC 9110 prescribes, or ``*``) answers 304 without a body.
* HTTP/1.1 (1.0 accepted), one request per connection (``Connection: close``). Limits:
  request line and headers at most :data:`MAX_HEAD` bytes (else 431), :data:`READ_TIMEOUT`
  seconds to send them (else 408), no request bodies (``Content-Length`` above 0 or any
  ``Transfer-Encoding``: 400), at most :data:`MAX_CONNECTIONS` connections at a time
  (others get 503). A malformed request gets 400; an unexpected error is logged and
  answered 500 with a fixed body -- never a traceback.
* TLS: outside ``--insecure`` the listener serves HTTPS with the gRPC server's
  ``--tls-cert``/``--tls-key``, TLS 1.2 minimum, no client certificates (the keys are
  public; TLS protects their integrity). The files are loaded once at start-up: unlike the
  gRPC port (:mod:`tokensvc.tls`), a certificate rotation needs a restart. Plaintext HTTP
  only in ``--insecure`` mode, and then only on a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import re
import ssl
from dataclasses import dataclass, field
from typing import Protocol

from tokensvc.config import ConfigError, Settings

log = logging.getLogger("tokensvc.http_jwks")

JWKS_PATH = "/.well-known/jwks.json"
DISCOVERY_PATH = "/.well-known/openid-configuration"
#: Most bytes of request line plus headers (including the blank line).
MAX_HEAD = 8 * 1024
#: Seconds a client has to send its request line and headers.
READ_TIMEOUT = 5.0
#: Connections served at the same time; more get 503 at once.
MAX_CONNECTIONS = 256
#: Seconds a response may take to be written (and a TLS connection to shut down).
WRITE_TIMEOUT = 5.0
#: Seconds to keep reading (and dropping) input after an error response.
LINGER_TIMEOUT = 1.0

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_ENTITY_TAG = re.compile(r'\s*(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')
_REASONS = {
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class KeySource(Protocol):
    """What the listener needs of :class:`tokensvc.keyring.KeyRing`."""

    @property
    def jwks_json(self) -> str: ...


class _BadRequest(Exception):
    """The request cannot be served; ``status`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Request:
    method: str
    path: str
    headers: dict[str, list[str]]


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "text/plain; charset=utf-8"


def discovery_document(issuer: str) -> dict[str, object]:
    """The discovery document served at :data:`DISCOVERY_PATH` (see the module doc)."""
    return {
        "issuer": issuer,
        "jwks_uri": issuer.rstrip("/") + JWKS_PATH,
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
                raise _BadRequest(400, "malformed If-None-Match")
            if found.group(1) == opaque:
                return True
            rest = rest[found.end() :].lstrip(" \t,")
    return False


def _parse_head(head: bytes) -> _Request:
    """Parse the request line and header fields (``head`` ends with the blank line).

    Raises:
        _BadRequest: anything that is not a well-formed HTTP/1.x request without a body.
    """
    lines = head[:-4].decode("latin-1").split("\r\n")
    if any("\n" in line or "\r" in line for line in lines):
        raise _BadRequest(400, "bare CR or LF")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if target.startswith("/"):
        path = target.split("?", 1)[0]
    elif re.match(r"https?://[^/?#]+", target, re.IGNORECASE):  # absolute form
        path = "/" + target.split("://", 1)[1].partition("/")[2].split("?", 1)[0]
    else:
        raise _BadRequest(400, "malformed request target")
    if not _FIELD_VALUE.fullmatch(path):
        raise _BadRequest(400, "malformed request target")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # no obsolete line folding, no space before the colon (RFC 9112 5.1, 5.2)
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise _BadRequest(400, "malformed header field")
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    if version == "HTTP/1.1" and len(headers.get("host", [])) != 1:
        raise _BadRequest(400, "HTTP/1.1 needs exactly one Host header")
    if "transfer-encoding" in headers:
        raise _BadRequest(400, "request bodies are not accepted")
    lengths = headers.get("content-length", [])
    if any(not v.isdigit() or int(v) != 0 for v in lengths):
        raise _BadRequest(400, "request bodies are not accepted")
    return _Request(method, path, headers)


@dataclass
class HttpJwks:
    """A started listener; ``port`` is the bound port (useful with ``HOST:0``)."""

    settings: Settings
    keys: KeySource
    server: asyncio.Server | None = None
    port: int = 0
    scheme: str = "https"
    _connections: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)
    _discovery: bytes = b""
    _cached: tuple[str, bytes, str] = ("", b"", "")

    def __post_init__(self) -> None:
        self._discovery = json.dumps(
            discovery_document(self.settings.issuer), separators=(",", ":")
        ).encode()

    async def stop(self) -> None:
        """Stop accepting, drop the connections still open, wait until all is closed."""
        if self.server is None:
            return
        self.server.close()
        # abort rather than cancel: each handler then ends normally (EOF or a reset), and
        # Python 3.11's stream callback would log a cancelled handler as an error
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=WRITE_TIMEOUT)
            for task in pending:
                task.cancel()
        await self.server.wait_closed()
        self.server = None

    # -- one connection ------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            response: _Response | None
            if len(self._connections) > MAX_CONNECTIONS:
                response, head_only = _error(503, "too many connections"), False
            else:
                response, head_only = await self._respond(reader)
            if response is not None:
                await asyncio.wait_for(self._write(writer, response, head_only), WRITE_TIMEOUT)
                if response.status >= 400:
                    await _linger(reader, writer)
        except (OSError, TimeoutError):
            pass  # the peer went away or does not read: nothing to tell it
        except Exception:
            log.exception("HTTP JWKS connection failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT)
            self._connections.pop(task, None)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[_Response | None, bool]:
        """The response to the one request on ``reader`` (``None``: say nothing), and
        whether it answers a HEAD."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _error(431, "request line and headers exceed 8 KiB"), False
        except asyncio.IncompleteReadError as err:
            # closed before the end of the headers: a half-closed peer still gets an answer
            return (_error(400, "incomplete request") if err.partial else None), False
        except TimeoutError:
            return _error(408, "request not received in time"), False
        try:
            request = _parse_head(head)
            return self._handle(request), request.method == "HEAD"
        except _BadRequest as err:
            return _error(err.status, str(err)), False
        except Exception:
            log.exception("HTTP JWKS request failed")
            return _error(500, "internal error"), False

    def _handle(self, request: _Request) -> _Response:
        if request.path == JWKS_PATH:
            body, etag = self._jwks()
            cache = f"public, max-age={self.settings.jwks_max_age}"
        elif request.path == DISCOVERY_PATH:
            body, etag = self._discovery, etag_of(self._discovery)
            cache = f"public, max-age={self.settings.jwks_max_age}"
        else:
            return _error(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return _error(405, "only GET and HEAD", (("Allow", "GET, HEAD"),))
        headers = (("ETag", etag), ("Cache-Control", cache))
        if _none_match(request.headers.get("if-none-match", []), etag):
            return _Response(304, headers=headers, content_type="")
        return _Response(200, body, headers, "application/json")

    def _jwks(self) -> tuple[bytes, str]:
        """The live JWK Set and its ETag (recomputed only when the ring changed)."""
        text = self.keys.jwks_json
        if text is not self._cached[0]:
            body = text.encode()
            self._cached = (text, body, etag_of(body))
        return self._cached[1], self._cached[2]

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: _Response, head_only: bool) -> None:
        lines = [
            f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
            f"Date: {email.utils.formatdate(usegmt=True)}",
            "Connection: close",
            "X-Content-Type-Options: nosniff",
        ]
        if response.status != 304:
            lines.append(f"Content-Type: {response.content_type}")
            lines.append(f"Content-Length: {len(response.body)}")
        lines += [f"{name}: {value}" for name, value in response.headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only and response.status != 304:
            writer.write(response.body)
        await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After an error response: end our side, then read and drop what the client still
    sends (briefly), so closing with unread input does not reset the connection before
    the client has read the response."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(LINGER_TIMEOUT):
            while await reader.read(MAX_HEAD):
                pass


def _error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> _Response:
    return _Response(status, (message + "\n").encode(), (("Cache-Control", "no-store"), *headers))


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


async def start_http(settings: Settings, keys: KeySource) -> HttpJwks:
    """Start the listener on ``settings.http_listen``; HTTPS unless ``settings.insecure``.

    Raises:
        ConfigError: no ``http_listen``, or unusable TLS files.
        OSError: the address cannot be bound.
    """
    if settings.http_listen is None:
        raise ConfigError("--http-listen is not set")
    host, _, port = settings.http_listen.rpartition(":")
    host = host.strip("[]")
    # plaintext only in --insecure mode, which Settings.validate confines to loopback
    context = None if settings.insecure else server_ssl_context(settings)
    http = HttpJwks(settings, keys, scheme="http" if context is None else "https")
    http.server = await asyncio.start_server(
        http._connection,
        host,
        int(port),
        ssl=context,
        ssl_handshake_timeout=READ_TIMEOUT if context is not None else None,
        limit=MAX_HEAD,
        reuse_port=settings.workers > 1,  # worker processes share the port, as for gRPC
    )
    http.port = http.server.sockets[0].getsockname()[1]
    log.info(
        "JWKS over %s on %s:%d (%s, %s)",
        http.scheme.upper(),
        host,
        http.port,
        JWKS_PATH,
        DISCOVERY_PATH,
    )
    return http
