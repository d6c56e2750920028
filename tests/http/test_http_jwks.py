"""The HTTP JWKS/discovery listener (``--http-listen``), end to end.

A real tokensvc on loopback; requests are written on raw sockets (so malformed ones can be
sent too) or, for HTTPS, with :mod:`http.client` trusting the development CA.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ServerThread
from tokensvc.cli.devcerts import Issued
from tokensvc.config import ConfigError, Settings
from tokensvc.http import gate, listener
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc

JWKS = "/.well-known/jwks.json"
DISCOVERY = "/.well-known/openid-configuration"
MAX_AGE = 77  # not the default, so the header must really come from the settings


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def exchange(port: int, data: bytes, *, half_close: bool = False) -> bytes:
    """Send ``data``, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> Reply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    # a refusal echoes the version the client sent (HTTP/1.0 when it could not be parsed)
    assert version == "HTTP/1.1" or (version.startswith("HTTP/") and int(status) >= 400)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate {name}"
        headers[name.lower()] = value.strip()
    return Reply(int(status), headers, body, raw)


def request(
    port: int, path: str = JWKS, method: str = "GET", headers: tuple[str, ...] = ()
) -> Reply:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    return parse(exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")))


def get_keys(srv: ServerThread, ca: Path | None = None) -> pb.GetKeysResponse:
    with channel(srv.target, ca=ca) if ca else srv.channel() as ch:
        stub = tokensvc_pb2_grpc.TokenServiceStub(ch)
        reply: pb.GetKeysResponse = stub.GetKeys(pb.GetKeysRequest(), timeout=10)
        return reply


def http_port(srv: ServerThread) -> int:
    assert srv.running.http is not None
    return srv.running.http.port


@pytest.fixture
def service(
    make_settings: Callable[..., Settings], start_server: Callable[..., ServerThread]
) -> ServerThread:
    return start_server(make_settings(http_listen="127.0.0.1:0", jwks_max_age=MAX_AGE))


@pytest.fixture
def port(service: ServerThread) -> int:
    return http_port(service)


# -- the documents -----------------------------------------------------------------------


def test_jwks_is_what_getkeys_returns_with_its_max_age(service, port):
    keys = get_keys(service)
    reply = request(port)
    assert reply.status == 200
    assert reply.body.decode() == keys.jwks
    assert json.loads(reply.body)["keys"]
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["content-length"] == str(len(reply.body))
    assert keys.max_age_seconds == MAX_AGE
    assert reply.headers["cache-control"] == f"public, max-age={keys.max_age_seconds}"
    assert reply.headers["connection"] == "close"
    # a query string does not change the resource
    assert request(port, JWKS + "?x=1").body == reply.body


def test_discovery_jwks_uri_keeps_a_port_the_issuer_names():
    from tokensvc.http.listener import discovery_document

    assert discovery_document("https://id.example:443/t", 8443)["jwks_uri"] == (
        "https://id.example:443/t/.well-known/jwks.json"
    )
    assert discovery_document("https://id.example", 443)["jwks_uri"] == (
        "https://id.example/.well-known/jwks.json"
    )


def test_discovery_document(service, port):
    reply = request(port, DISCOVERY)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == {
        "issuer": "https://tokensvc.test",
        # the port the JWKS is actually served on (the issuer names none)
        "jwks_uri": f"https://tokensvc.test:{port}/.well-known/jwks.json",
        "id_token_signing_alg_values_supported": ["ES256"],
    }
    etag = reply.headers["etag"]
    assert request(port, DISCOVERY, headers=(f"If-None-Match: {etag}",)).status == 304


def test_etag_and_if_none_match(port):
    reply = request(port)
    etag = reply.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10  # strong
    assert etag == listener.etag_of(reply.body)
    for value in (etag, f'"other", {etag}', f"W/{etag}", "*", f' "x" ,W/"y",  {etag} '):
        not_modified = request(port, headers=(f"If-None-Match: {value}",))
        assert not_modified.status == 304, value
        assert not_modified.body == b""
        assert not_modified.headers["etag"] == etag
        assert not_modified.headers["cache-control"] == f"public, max-age={MAX_AGE}"
        assert "content-length" not in not_modified.headers
    # two field lines make one list
    assert request(port, headers=('If-None-Match: "a"', f"If-None-Match: {etag}")).status == 304
    for value in ('"other"', 'W/"other", "more"', '"' + etag[1:-2] + '"'):
        full = request(port, headers=(f"If-None-Match: {value}",))
        assert (full.status, full.body) == (200, reply.body), value
    assert request(port, headers=("If-None-Match: not-a-tag",)).status == 400


def test_head_has_the_get_headers_and_no_body(port):
    full = request(port)
    head = request(port, method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["content-length"] == str(len(full.body))
    for name in ("etag", "cache-control", "content-type"):
        assert head.headers[name] == full.headers[name]
    etag = full.headers["etag"]
    assert request(port, method="HEAD", headers=(f"If-None-Match: {etag}",)).status == 304


def test_rotation_shows_without_restart(service, port):
    before = request(port)
    with service.channel() as ch:
        stub = tokensvc_pb2_grpc.TokenServiceStub(ch)
        stub.RotateKeys(pb.RotateKeysRequest(), timeout=10)  # a pending key is published
    after = request(port)
    assert after.body.decode() == get_keys(service).jwks
    assert len(json.loads(after.body)["keys"]) == len(json.loads(before.body)["keys"]) + 1
    assert after.headers["etag"] != before.headers["etag"]
    stale = request(port, headers=(f"If-None-Match: {before.headers['etag']}",))
    assert (stale.status, stale.body) == (200, after.body)


def test_other_paths_404_and_other_methods_405(port):
    for path in ("/", "/.well-known/jwks.json/", "/jwks.json", "/.well-known/JWKS.JSON"):
        reply = request(port, path)
        assert reply.status == 404, path
        assert reply.headers["cache-control"] == "no-store"
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"):
        for path in (JWKS, DISCOVERY):
            reply = request(port, path, method, headers=("Content-Length: 0",))
            assert reply.status == 405, method
            assert reply.headers["allow"] == "GET, HEAD"


# -- hostile and broken requests ---------------------------------------------------------


def test_oversized_headers_are_refused_and_the_server_keeps_serving(port):
    big = "X-Filler: " + "a" * 9000
    reply = request(port, headers=(big,))
    assert reply.status == 431
    many = tuple(f"X-{i}: {'b' * 90}" for i in range(100))  # ~10 KiB in small lines
    assert request(port, headers=many).status == 431
    # just under the limit is fine
    assert request(port, headers=("X-Filler: " + "a" * 7000,)).status == 200


MALFORMED = [
    b"hello\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS hello
    b"GET /.well-known/jwks.json\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET .well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\n\r\n",  # no Host
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nX-A: \x00\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_requests_get_400_and_the_server_keeps_serving(port, data):
    reply = parse(exchange(port, data))
    assert reply.status == 400
    assert b"Traceback" not in reply.raw and b"Error" not in reply.body
    assert request(port).status == 200


def test_a_request_cut_short_gets_no_answer(port):
    # empty lines before a request line are ignored (RFC 9112 2.2), then the peer is gone
    for data in (b"GET /.well-known/jwks.json HTT", b"", b"\r\n\r\n"):
        assert exchange(port, data, half_close=True) == b"", data
    assert request(port).status == 200


@pytest.fixture
def tight(monkeypatch, make_settings, start_server) -> Callable[..., int]:
    """A listener started after lowering the gate's limits (``tight(NAME=value, ...)``)."""

    def start(**limits: float) -> int:
        for name, value in limits.items():
            monkeypatch.setattr(gate, name, value)
        return http_port(start_server(make_settings(http_listen="127.0.0.1:0")))

    return start


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (without a response) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:  # a reset, or a TLS connection ended without close_notify
        return True


def test_a_slow_request_is_dropped(tight):
    port = tight(READ_TIMEOUT=0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n")  # no blank line
        for _ in range(3):  # trickling more header lines does not extend the deadline
            time.sleep(0.1)
            sock.sendall(b"X-More: 1\r\n")
        assert _closed_within(sock, 10)
    assert request(port).status == 200


def test_connections_beyond_the_limits_are_closed_at_once(tight):
    port = tight(MAX_CONNECTIONS=3, MAX_PER_CLIENT=2)
    mine = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    other = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
    try:
        # a third connection from the same client is refused; so is a fourth in all
        assert _closed_within(socket.create_connection(("127.0.0.1", port)), 10)
        assert _closed_within(
            socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0)), 10
        )
        for sock in (*mine, other):  # those admitted are served
            sock.sendall(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert parse(b"".join(iter(lambda s=sock: s.recv(65536), b""))).status == 200
        # their slots are free again
        assert request(port).status == 200
    finally:
        for sock in (*mine, other):
            sock.close()


def test_client_of_counts_ipv6_by_64():
    assert gate.client_of(("127.0.0.1", 5)) == "127.0.0.1"
    assert gate.client_of(("::ffff:10.1.2.3", 5, 0, 0)) == "10.1.2.3"
    a = gate.client_of(("2001:db8:1:2::1", 5, 0, 0))
    assert a == gate.client_of(("2001:db8:1:2:ffff::9", 6, 0, 0)) == "2001:db8:1:2::/64"
    assert a != gate.client_of(("2001:db8:1:3::1", 5, 0, 0))


# -- configuration -----------------------------------------------------------------------


def test_off_by_default(tokensvc):
    assert tokensvc.settings.http_listen is None
    assert tokensvc.running.http is None


def test_plaintext_only_on_loopback(make_settings):
    # refused when the settings are validated, before anything starts
    with pytest.raises(ConfigError, match="loopback"):
        make_settings(http_listen="0.0.0.0:0")


def test_stop_closes_the_listener(make_settings):
    srv = ServerThread(make_settings(http_listen="127.0.0.1:0"))
    port = http_port(srv)
    assert request(port).status == 200
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


# -- HTTPS -------------------------------------------------------------------------------


def _https(port: int, ctx: ssl.SSLContext, path: str = JWKS) -> tuple[str, Reply]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)
    try:
        conn.request("GET", path)
        assert isinstance(conn.sock, ssl.SSLSocket)
        version = str(conn.sock.version())
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return version, Reply(resp.status, headers, resp.read(), b"")
    finally:
        conn.close()


def _client_context(
    ca: Path,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if minimum < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("ALL:@SECLEVEL=0")  # let OpenSSL offer TLS 1.1 at all
    return ctx


def _tls11_control(issued: Issued, ctx: ssl.SSLContext) -> str:
    """The TLS version ``ctx`` negotiates with a Python server that allows TLS 1.1."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(issued.cert, issued.key)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    server_ctx.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with (
        socket.create_connection(listener.getsockname()[:2], timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        version = str(tls.version())
    thread.join(10)
    return version


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_https_with_the_service_certificate(make_settings, start_server, dev_pki):
    issued = dev_pki["server"]
    srv = start_server(
        make_settings(
            insecure=False,
            tls_cert=issued.cert,
            tls_key=issued.key,
            http_listen="127.0.0.1:0",
        )
    )
    port = http_port(srv)
    assert srv.running.http is not None and srv.running.http.scheme == "https"
    version, reply = _https(port, _client_context(issued.ca))
    assert version in ("TLSv1.2", "TLSv1.3")
    assert reply.status == 200
    assert reply.body.decode() == get_keys(srv, ca=issued.ca).jwks
    assert reply.headers["cache-control"] == f"public, max-age={srv.settings.jwks_max_age}"
    _, discovery = _https(port, _client_context(issued.ca), DISCOVERY)
    assert json.loads(discovery.body)["issuer"] == srv.settings.issuer
    # TLS 1.2 exactly works too
    tls12 = _client_context(issued.ca, maximum=ssl.TLSVersion.TLSv1_2)
    assert _https(port, tls12)[0] == "TLSv1.2"
    # the certificate really is checked: without the dev CA the client refuses it
    with pytest.raises(ssl.SSLCertVerificationError):
        _https(port, ssl.create_default_context())
    # no plaintext HTTP on the TLS port
    answer = exchange(port, b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not answer.startswith(b"HTTP/")
    # TLS 1.1: this client negotiates it where allowed, and is refused here
    tls11 = _client_context(
        issued.ca, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1
    )
    assert _tls11_control(issued, tls11) == "TLSv1.1"
    with pytest.raises(ssl.SSLError):
        _https(port, tls11)
    assert _https(port, _client_context(issued.ca))[1].status == 200


def test_half_open_tls_connections_from_one_client_do_not_starve_others(
    make_settings, start_server, dev_pki, monkeypatch
):
    monkeypatch.setattr(gate, "HANDSHAKE_TIMEOUT", 1.0)
    monkeypatch.setattr(gate, "READ_TIMEOUT", 1.0)
    issued = dev_pki["server"]
    srv = start_server(
        make_settings(
            insecure=False, tls_cert=issued.cert, tls_key=issued.key, http_listen="127.0.0.1:0"
        )
    )
    port = http_port(srv)
    # one client opens 300 connections and sends no request: half of them never finish the
    # TLS handshake (a ClientHello record header, then silence), half finish it and stop
    ctx = _client_context(issued.ca)
    hostile: list[socket.socket] = []
    try:
        for i in range(300):
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
            )
            hostile.append(sock)
            if i % 2:
                sock.sendall(b"\x16\x03\x01\x02\x00")
                continue
            try:
                hostile[-1] = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
            except OSError:
                hostile.pop()  # refused (and closed): the client is at its cap
        for _ in range(3):  # every legitimate fetch from another client is served
            assert _https(port, ctx)[1].status == 200
        # the hostile client holds at most its cap; the rest were closed at once
        assert sum(not _closed_within(s, 0.01) for s in hostile) <= gate.MAX_PER_CLIENT
        # and those it holds are dropped when the handshake timeout expires
        assert all(_closed_within(s, 10) for s in hostile)
    finally:
        for sock in hostile:
            sock.close()


def test_refused_requests_never_log_what_they_carried(port, caplog):
    secret = "eyJhbGciOiJFUzI1NiJ9." + "s" * 9000  # a token-like header past the line limit
    with caplog.at_level("DEBUG"):
        assert request(port, headers=(f"Authorization: Bearer {secret}",)).status == 431
        assert parse(exchange(port, f"GET /{secret[:40]} HTTP/3.0\r\n\r\n".encode())).status == 400
        assert request(port).status == 200
    assert "eyJhbGci" not in caplog.text
