"""Fixtures of the client-library tests: a sample protected service behind the interceptors.

The sample service ``tokensvc.test.Sample`` has one method of each RPC kind, on raw bytes
(no proto needed); each answers with the claims its handler sees through
``current_claims_or_none()``. It runs either on a blocking ``grpc.server`` with
:class:`AuthInterceptor` or on a ``grpc.aio`` server (own event loop thread) with
:class:`AioAuthInterceptor`; both fetch keys from the real tokensvc through a counting
wrapper around ``TokenClient.get_keys`` / ``AsyncTokenClient.get_keys``
(:func:`tests.support.protected.start_server`). Tests talk to
either with the same blocking client code. With ``server_credentials`` the sample service
serves TLS (e.g. mTLS with a certificate of :func:`tokensvc.cli.devcerts.write_dev_pki`); tests
then open their own channels with :meth:`Protected.secure_channel`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import ServerThread
from tests.support.feed import Feed
from tests.support.protected import Setup, start_server
from tokensvc_client import DEFAULT_EXEMPT, TokenClient, current_claims_or_none

SERVICE = "tokensvc.test.Sample"
#: name prefix of the blocking sample server's worker threads
WORKER = "sample-worker"
PUBLIC = f"/{SERVICE}/Public"
#: RPC kind -> full method name of the sample service
METHODS = {
    "unary_unary": f"/{SERVICE}/Unary",
    "unary_stream": f"/{SERVICE}/ServerStream",
    "stream_unary": f"/{SERVICE}/ClientStream",
    "stream_stream": f"/{SERVICE}/BidiStream",
}


def _seen() -> bytes:
    claims = current_claims_or_none()
    if claims is None:
        return b'{"claims": null}'
    return json.dumps(
        {"sub": claims.subject, "roles": list(claims.roles), "jti": claims.token_id}
    ).encode()


def _sync_handler(calls: list[str]) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: Any) -> bytes:
        calls.append("unary")
        return _seen()

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        calls.append("server_stream")
        yield _seen()
        yield _seen()

    def client_stream(requests: Iterator[bytes], context: Any) -> bytes:
        calls.append("client_stream")
        for _ in requests:
            pass
        return _seen()

    def bidi(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        calls.append("bidi")
        for _ in requests:
            yield _seen()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "BidiStream": grpc.stream_stream_rpc_method_handler(bidi),
            "Public": grpc.unary_unary_rpc_method_handler(unary),
        },
    )


def _aio_handler(calls: list[str]) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: Any) -> bytes:
        calls.append("unary")
        await asyncio.sleep(0)  # the claims survive a suspension
        return _seen()

    async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        calls.append("server_stream")
        yield _seen()
        await asyncio.sleep(0)
        yield _seen()

    async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
        calls.append("client_stream")
        async for _ in requests:
            pass
        return _seen()

    async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        calls.append("bidi")
        async for _ in requests:
            yield _seen()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "BidiStream": grpc.stream_stream_rpc_method_handler(bidi),
            "Public": grpc.unary_unary_rpc_method_handler(unary),
        },
    )


@dataclass
class Protected:
    """A running sample service; ``fetches`` names the thread of each JWKS fetch,
    ``calls`` the handlers that ran."""

    target: str
    fetches: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None
    _channel: grpc.Channel | None = None
    _extra_channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    def secure_channel(self, credentials: grpc.ChannelCredentials) -> grpc.Channel:
        """A TLS channel to the service, closed with it."""
        ch = grpc.secure_channel(self.target, credentials)
        self._extra_channels.append(ch)
        return ch

    def close_channels(self) -> None:
        for ch in [self._channel, *self._extra_channels]:
            if ch is not None:
                ch.close()

    def call(
        self,
        kind: str,
        metadata: tuple[tuple[str, str], ...] = (),
        channel: grpc.Channel | None = None,
    ) -> list[dict]:
        """Call the method of ``kind`` (on ``channel``, by default a plaintext one); the
        claims the handler saw, one per response."""
        method = METHODS[kind]
        requests = iter([b"a", b"b"])
        ch = channel or self.channel
        if kind == "unary_unary":
            out = [ch.unary_unary(method)(b"x", metadata=metadata, timeout=10)]
        elif kind == "unary_stream":
            out = list(ch.unary_stream(method)(b"x", metadata=metadata, timeout=10))
        elif kind == "stream_unary":
            out = [ch.stream_unary(method)(requests, metadata=metadata, timeout=10)]
        else:
            out = list(ch.stream_stream(method)(requests, metadata=metadata, timeout=10))
        return [json.loads(item) for item in out]

    def public(self) -> dict:
        return json.loads(self.channel.unary_unary(PUBLIC)(b"x", timeout=10))

    def health(self, metadata: tuple[tuple[str, str], ...] = ()) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10).status


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def refusal(protected: Protected, token: str) -> grpc.RpcError | None:
    """The error of one call with ``token``, or None if it was accepted."""
    try:
        protected.call("unary_unary", bearer(token))
    except grpc.RpcError as err:
        return err
    return None


@pytest.fixture
def make_protected() -> Iterator[Callable[..., Protected]]:
    """``make_protected(service, kind, cache_kw={}, server_credentials=None,
    **interceptor_kw)`` -> Protected; plaintext unless ``server_credentials`` is given."""
    started: list[Protected] = []

    def make(
        service: ServerThread,
        kind: str = "sync",
        cache_kw: dict[str, Any] | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        **interceptor_kw: Any,
    ) -> Protected:
        interceptor_kw.setdefault("exempt", (*DEFAULT_EXEMPT, PUBLIC))
        protected = Protected(target="")
        sync = kind == "sync"
        setup = Setup(
            handler=(_sync_handler if sync else _aio_handler)(protected.calls),
            fetches=protected.fetches,
            cache_kw=cache_kw or {},
            interceptor_kw=interceptor_kw,
            credentials=server_credentials,
            worker_prefix=WORKER,
            health=True,
        )
        protected.target, protected.stop = start_server(service, "sync" if sync else "aio", setup)
        started.append(protected)
        return protected

    yield make
    for protected in started:
        protected.close_channels()
        protected.stop()


@pytest.fixture
def client(tokensvc: ServerThread) -> Iterator[TokenClient]:
    with TokenClient(tokensvc.target, insecure=True) as c:
        yield c


@pytest.fixture
def make_feed() -> Iterator[Callable[..., Feed]]:
    """``make_feed(target, kind="sync", **feed_kw)`` -> a started :class:`Feed`, closed
    after the test."""
    started: list[Feed] = []

    def make(target: str, kind: str = "sync", **kw: Any) -> Feed:
        feed = Feed(target, kind, **kw)
        started.append(feed)
        return feed

    yield make
    for feed in reversed(started):
        feed.close()
