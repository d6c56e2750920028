"""WatchRevocations' caps count per identity, wherever it connects from (an identity picks
its addresses: counting identity and address let one hold 320 streams from 20 addresses),
and full catch-ups -- streams without a resumable position, the expensive ones -- are
rate-limited per client, while resumed streams are not.

Real gRPC over mTLS; other source addresses (127.0.0.2, ...) come through a small
loopback TCP forwarder that connects from them (gRPC cannot bind a source address).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import grpc

from tests.support.feed import Watcher
from tokensvc.config import Rate
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc

Kind = pb.RevocationEvent


class SourceProxy:
    """Forwards each connection accepted on a loopback port to ``127.0.0.1:target``,
    connecting from ``source``: the server sees the caller at ``source``."""

    def __init__(self, target: int, source: str) -> None:
        self.target, self.source = target, source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(
                ("127.0.0.1", self.target), timeout=10, source_address=(self.source, 0)
            )
            upstream.settimeout(None)
            self.sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _refusal(watcher: Watcher, timeout: float = 5.0) -> grpc.RpcError:
    deadline = time.monotonic() + timeout
    while watcher.error is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert watcher.error is not None
    return watcher.error


def test_the_cap_counts_an_identity_across_its_addresses(mtls_service):
    svc = mtls_service("", max_watchers_per_client=3)
    orders = svc.pki["orders"]
    proxies = [SourceProxy(svc.server.port, f"127.0.0.{n}") for n in range(2, 7)]
    channels = [
        channel(f"127.0.0.1:{proxy.port}", ca=orders.ca, cert=orders.cert, key=orders.key)
        for proxy in proxies
    ]
    watchers: list[Watcher] = []
    try:
        for chan in channels[:3]:  # three addresses, three streams: the cap
            watchers.append(Watcher(tokensvc_pb2_grpc.TokenServiceStub(chan)))
            assert watchers[-1].next().kind == Kind.RESET
        for chan in channels[3:]:  # from yet other addresses: still the same identity
            watchers.append(Watcher(tokensvc_pb2_grpc.TokenServiceStub(chan)))
            refused = _refusal(watchers[-1])
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "per client" in str(refused.details())
        # another identity keeps its own allowance
        other = Watcher(svc.stub("billing"))
        watchers.append(other)
        assert other.next().kind == Kind.RESET
    finally:
        for watcher in watchers:
            watcher.close()
        for chan in channels:
            chan.close()
        for proxy in proxies:
            proxy.close()


def test_full_catch_ups_are_rate_limited_resumed_streams_are_not(make_settings, start_server):
    # two full catch-ups per client, and no more for an hour
    scarce = Rate(2, 7200)
    srv = start_server(make_settings(max_watchers_per_client=50, rate_full_catch_ups=scarce))
    stub = srv.stub()
    sid = stub.Issue(pb.IssueRequest(subject="alice")).tokens.session_id
    stub.Revoke(pb.RevokeRequest(session_id=sid))
    first = Watcher(stub)
    events = first.take(2)
    assert events[0].kind == Kind.RESET and events[1].value == sid
    first.close()
    second = Watcher(stub)
    assert second.next().kind == Kind.RESET
    second.close()
    watchers: list[Watcher] = []
    try:
        # a third fresh stream, or one from a position the feed never issued: refused,
        # with a retry-after, before any catch-up is copied
        for resume_from in ("", "0-1", "18446744073709551615-0"):
            watcher = Watcher(stub, resume_from=resume_from)
            watchers.append(watcher)
            refused = _refusal(watcher)
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, resume_from
            trailers = dict(refused.trailing_metadata() or ())
            assert int(trailers["retry-after"]) >= 1
        # resumed streams cost only what they missed: never limited
        for _ in range(5):
            resumed = Watcher(stub, resume_from=events[1].id)
            watchers.append(resumed)
            later = stub.Issue(pb.IssueRequest(subject="bob")).tokens.session_id
            stub.Revoke(pb.RevokeRequest(session_id=later))
            assert resumed.next().value != ""
            assert resumed.error is None
    finally:
        for watcher in watchers:
            watcher.close()
