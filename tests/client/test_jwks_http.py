"""HttpsJwksSource: the service's HTTP JWKS endpoint as the key source of the JWKS caches.

The key sets come from a real tokensvc (its ``--http-listen`` listener). Where a test needs
to see or shape the HTTP traffic, a tiny stdlib ``http.server`` in a thread sits in between
(:class:`Relay`, forwarding to the real listener and counting) or replaces the service
(:class:`Hostile`, answering whatever the test says).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest

from tests.support import ServerThread
from tokensvc.cli.devcerts import DEFAULT_WORKLOADS
from tokensvc.config import Settings
from tokensvc_client import (
    AsyncJwksCache,
    AuthInterceptor,
    HttpsJwksSource,
    JwksCache,
    KeysUnavailable,
    TokenClient,
    Verifier,
)
from tokensvc_client.jwks_http import max_age_of
from tokensvc_client.v1 import tokensvc_pb2 as pb

JWKS = "/.well-known/jwks.json"
POLICY = f"""
[rpc.Issue]
allow = ["{DEFAULT_WORKLOADS["login"]}"]
"""
#: Response = (status, headers, body)
Response = tuple[int, list[tuple[str, str]], bytes]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Server:
    """A stdlib HTTP server in a thread; ``requests`` holds each request's path and headers
    (lower-case names), ``answer(headers)`` makes each response."""

    def __init__(self, answer: Callable[[dict[str, str]], Response]) -> None:
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append({":path": self.path, **headers})
                status, out, body = answer(headers)
                self.send_response(status)
                for name, value in [*out, ("Connection", "close")]:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a short poll interval: shutdown() returns at once (see serve_forever)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = JWKS) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class Relay(_Server):
    """Forwards each GET to the real listener (with its If-None-Match); ``statuses`` are
    the real listener's answers."""

    def __init__(self, port: int) -> None:
        self.statuses: list[int] = []

        def forward(headers: dict[str, str]) -> Response:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                sent = (
                    {"If-None-Match": headers["if-none-match"]}
                    if "if-none-match" in headers
                    else {}
                )
                conn.request("GET", JWKS, headers=sent)
                resp = conn.getresponse()
                body = resp.read()
                self.statuses.append(resp.status)
                keep = ("ETag", "Cache-Control", "Content-Type", "Content-Length")
                return resp.status, [(k, v) for k, v in resp.getheaders() if k in keep], body
            finally:
                conn.close()

        super().__init__(forward)


@pytest.fixture
def servers() -> Iterator[Callable[..., Any]]:
    """Start :class:`Relay` / :class:`_Server` instances, closed after the test."""
    started: list[_Server] = []

    def start(kind: type[_Server], arg: Any) -> Any:
        srv = kind(arg)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()


@pytest.fixture
def service(
    make_settings: Callable[..., Settings], start_server: Callable[..., ServerThread]
) -> ServerThread:
    """A plaintext (loopback) tokensvc with the HTTP listener."""
    return start_server(make_settings(http_listen="127.0.0.1:0", jwks_max_age=111))


def http_port(srv: ServerThread) -> int:
    assert srv.running.http is not None
    return srv.running.http.port


def issue(srv: ServerThread, subject: str = "alice") -> str:
    with TokenClient(srv.target, insecure=True) as client:
        return client.issue(subject).access_token


def get_keys(srv: ServerThread) -> str:
    with TokenClient(srv.target, insecure=True) as client:
        return client.get_keys().jwks_json


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def with_header(token: str, header: dict[str, str]) -> str:
    """``token``'s claims under another header, with a (meaningless) signature."""
    return ".".join([_b64(json.dumps(header).encode()), token.split(".")[1], _b64(b"\1" * 64)])


# -- against the real service ------------------------------------------------------------


def test_a_real_token_verifies_with_keys_fetched_over_https(mtls_service):
    svc = mtls_service(POLICY, http_listen="127.0.0.1:0", jwks_max_age=120)
    ca = svc.pki["server"].ca
    token = svc.stub("login").Issue(pb.IssueRequest(subject="alice")).tokens.access_token
    port = http_port(svc.server)
    verifier = Verifier(svc.server.settings.issuer, "mesh")
    for host in ("127.0.0.1", "localhost"):
        source = HttpsJwksSource(f"https://{host}:{port}{JWKS}", ca=ca)
        keys = JwksCache(source).load()
        assert verifier.verify(token, keys).subject == "alice"
    jwks = source()
    assert jwks.max_age_seconds == 120
    assert jwks.jwks_json == svc.stub("orders").GetKeys(pb.GetKeysRequest()).jwks
    # the asyncio cache takes the async variant
    keys = asyncio.run(AsyncJwksCache(source.fetch_async).load())
    assert verifier.verify(token, keys).subject == "alice"
    # the certificate is checked: without the pinned CA the fetch fails
    with pytest.raises(KeysUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        JwksCache(HttpsJwksSource(f"https://127.0.0.1:{port}{JWKS}")).load()


def test_not_modified_reuses_the_previous_key_set(service, servers):
    relay = servers(Relay, http_port(service))
    token = issue(service)
    source = HttpsJwksSource(relay.url(), allow_insecure_loopback=True)
    clock = FakeClock()
    cache = JwksCache(source, clock=clock)
    first = cache.load()
    clock.now += 111  # the max age the listener sent
    assert cache.needs_fetch()
    second = cache.answer()
    assert second is not None and second is not first
    assert relay.statuses == [200, 304]
    assert "if-none-match" not in relay.requests[0]
    assert relay.requests[1]["if-none-match"].startswith('"')
    assert Verifier(service.settings.issuer, "mesh").verify(token, second).subject == "alice"
    assert second.kids == first.kids
    again = source()
    assert (again.jwks_json, again.max_age_seconds) == (get_keys(service), 111)
    assert relay.statuses == [200, 304, 304]


def test_plain_http_only_to_loopback_and_only_when_allowed(service):
    port = http_port(service)
    url = f"http://127.0.0.1:{port}{JWKS}"
    with pytest.raises(ValueError, match="https"):
        HttpsJwksSource(url)
    jwks = HttpsJwksSource(url, allow_insecure_loopback=True)()
    assert jwks.jwks_json == get_keys(service)
    assert HttpsJwksSource(f"http://localhost:{port}{JWKS}", allow_insecure_loopback=True)()
    HttpsJwksSource("http://[::1]:8080/jwks.json", allow_insecure_loopback=True)  # accepted
    for bad in (
        "http://example.com/jwks.json",
        "http://10.0.0.1/jwks.json",
        "http://127.0.0.1.example.com/jwks.json",
        "ftp://127.0.0.1/jwks.json",
        "file:///etc/passwd",
        "https://user:secret@example.com/jwks.json",
        "https:///jwks.json",
        "https://example.com/jwks.json#x",
        "https://example.com:99999/jwks.json",
        "/.well-known/jwks.json",
    ):
        with pytest.raises(ValueError):
            HttpsJwksSource(bad, allow_insecure_loopback=True)


def test_unknown_kid_refetches_at_most_once_per_interval(service, servers):
    """Through the real AuthInterceptor: a flood of tokens with unknown kids costs one
    request to the JWKS URL per ``min_refetch_interval``; a ``jku`` in a token is never
    fetched."""
    relay = servers(Relay, http_port(service))
    decoy = servers(_Server, lambda _h: (200, [("Content-Type", "application/json")], b"{}"))
    token = issue(service)
    clock = FakeClock()
    cache = JwksCache(
        HttpsJwksSource(relay.url(), allow_insecure_loopback=True),
        clock=clock,
        min_refetch_interval=30,
    )
    interceptor = AuthInterceptor(cache, issuer=service.settings.issuer, audience="mesh")
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Sample", {"Echo": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    unknown = with_header(token, {"alg": "ES256", "typ": "at+jwt", "kid": "no-such-kid"})
    jku = with_header(
        token, {"alg": "ES256", "typ": "at+jwt", "kid": "no-such-kid", "jku": decoy.url()}
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/test.Sample/Echo")

            def call(tok: str) -> str:
                try:
                    echo(b"x", metadata=(("authorization", f"Bearer {tok}"),), timeout=10)
                    return "ok"
                except grpc.RpcError as err:
                    return str(err.details())

            assert call(token) == "ok"
            assert len(relay.requests) == 1  # the first call loaded the key set
            clock.now += 30
            assert [call(unknown) for _ in range(10)] == ["invalid token: unknown_key"] * 10
            assert len(relay.requests) == 2  # one refetch for ten unknown kids
            clock.now += 29
            assert call(unknown) == "invalid token: unknown_key"
            assert call(token) == "ok"
            assert len(relay.requests) == 2
            clock.now += 1
            assert call(unknown) == "invalid token: unknown_key"
            assert len(relay.requests) == 3
            assert call(jku) == "invalid token: bad_header"
            assert len(relay.requests) == 3
    finally:
        server.stop(None)
    assert all(r[":path"] == JWKS for r in relay.requests)
    assert decoy.requests == []


# -- hostile or broken endpoints ---------------------------------------------------------


def _answer(jwks: str, **kw: Any) -> Callable[[dict[str, str]], Response]:
    """A JWKS response, with ``kw`` overriding status/content_type/body/length/extra."""
    body = kw.get("body", jwks.encode())
    headers = [("Content-Type", kw.get("content_type", "application/json"))]
    if kw.get("length", True):
        headers.append(("Content-Length", str(len(body))))
    headers += kw.get("extra", [])
    return lambda _h: (kw.get("status", 200), headers, body)


def test_refused_responses(service, servers):
    jwks = get_keys(service)
    padded = json.dumps({"keys": json.loads(jwks)["keys"], "pad": "x" * 70_000})
    target = servers(_Server, _answer(jwks))
    refused = {
        "larger than": [
            _answer(padded),  # declared too large
            _answer(padded, length=False),  # read until close, cut at the cap
        ],
        "not application/json": [
            _answer(jwks, content_type="text/html"),
            _answer(jwks, content_type="application/jsonx"),
        ],
        "unusable JWK Set": [
            _answer("<html>hello</html>"),
            _answer('{"keys": "not a list"}'),
            _answer('{"keys": [{"kty": "oct", "k": "AAAA", "kid": "x"}]}'),
        ],
        "UnicodeDecodeError": [_answer(jwks, body=b'{"keys": [\xff]}')],
        "status 302": [_answer(jwks, status=302, extra=[("Location", target.url())])],
        "status 500": [_answer(jwks, status=500)],
        "no key set was fetched before": [_answer(jwks, status=304, body=b"")],
        "compressed": [_answer(jwks, extra=[("Content-Encoding", "gzip")])],
    }
    for message, answers in refused.items():
        for answer in answers:
            hostile = servers(_Server, answer)
            source = HttpsJwksSource(hostile.url(), allow_insecure_loopback=True)
            with pytest.raises(KeysUnavailable, match=message):
                source()
            with pytest.raises(KeysUnavailable):
                JwksCache(source).load()
    assert target.requests == []  # the redirect was not followed
    # the same shapes within the limits are accepted
    fits = json.dumps({"keys": json.loads(jwks)["keys"], "pad": "x" * 60_000})
    for answer in (_answer(fits), _answer(fits, length=False)):
        source = HttpsJwksSource(servers(_Server, answer).url(), allow_insecure_loopback=True)
        assert len(source().key_set()) >= 1
    ok = servers(_Server, _answer(jwks, content_type="application/jwk-set+json; charset=utf-8"))
    assert HttpsJwksSource(ok.url(), allow_insecure_loopback=True)().jwks_json == jwks


def test_a_refused_response_does_not_replace_the_last_good_one(service, servers):
    jwks = get_keys(service)
    answers = [
        (200, [("Content-Type", "application/json"), ("ETag", '"good"')], jwks.encode()),
        (200, [("Content-Type", "application/json"), ("ETag", '"bad"')], b"garbage"),
        (304, [("ETag", '"good"')], b""),
    ]
    hostile = servers(_Server, lambda _h: answers.pop(0))
    source = HttpsJwksSource(hostile.url(), allow_insecure_loopback=True, max_age_default=42)
    assert source().jwks_json == jwks
    with pytest.raises(KeysUnavailable):
        source()
    again = source()
    assert (again.jwks_json, again.max_age_seconds) == (jwks, 42)
    assert [r.get("if-none-match") for r in hostile.requests] == [None, '"good"', '"good"']


def test_cache_control_parsing():
    assert max_age_of(None, 300) == 300
    assert max_age_of("public, max-age=77", 300) == 77
    assert max_age_of('max-age="12"', 300) == 12
    assert max_age_of("public", 300) == 300
    assert max_age_of("max-age=60, no-cache", 300) == 0
    assert max_age_of("no-store", 300) == 0
    assert max_age_of("max-age=999999999", 300) == 86400
    assert max_age_of("max-age=abc", 300) == 300
