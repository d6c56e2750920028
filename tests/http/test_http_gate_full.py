"""The JWKS listener keeps serving new clients while full: 17 clients holding their cap of
half-open TLS connections each fill every global slot, and another sidecar's fetch is
still served -- the largest holder's oldest handshaking connection is dropped for it --
while a hostile client cannot take a slot back from its peers.

A real tokensvc with the HTTPS listener on loopback; the gate's limits lowered (as in
tests/http/test_http_jwks.py); clients at distinct loopback source addresses.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable

from tests.http.test_http_jwks import JWKS, _client_context, _closed_within, http_port
from tokensvc.http import gate

HOSTILE = [f"127.0.0.{n}" for n in range(2, 19)]  # 17 clients
PER_CLIENT = 2


def _connect(port: int, ctx: ssl.SSLContext, source: str) -> ssl.SSLSocket:
    """A TLS connection from ``source`` (handshake done, no request yet)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def _get(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET " + JWKS.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return b"".join(iter(lambda: tls.recv(65536), b""))


def _wait(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_full_gate_still_serves_a_new_client(make_settings, start_server, dev_pki, monkeypatch):
    monkeypatch.setattr(gate, "MAX_PER_CLIENT", PER_CLIENT)
    monkeypatch.setattr(gate, "MAX_CONNECTIONS", len(HOSTILE) * PER_CLIENT)
    monkeypatch.setattr(gate, "HANDSHAKE_TIMEOUT", 60.0)  # nothing expires in the test
    issued = dev_pki["server"]
    srv = start_server(
        make_settings(
            insecure=False, tls_cert=issued.cert, tls_key=issued.key, http_listen="127.0.0.1:0"
        )
    )
    port = http_port(srv)
    assert srv.running.http is not None and srv.running.http.gate is not None
    the_gate = srv.running.http.gate
    hostile: list[socket.socket] = []
    served: list[ssl.SSLSocket] = []
    try:
        for source in HOSTILE:  # each holds its cap of half-open TLS connections
            for _ in range(PER_CLIENT):
                sock = socket.create_connection(
                    ("127.0.0.1", port), timeout=10, source_address=(source, 0)
                )
                sock.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello header, then silence
                hostile.append(sock)
        _wait(lambda: the_gate.connections == gate.MAX_CONNECTIONS)
        ctx = _client_context(issued.ca)
        # other sidecars get in while the gate is full (six at once, each making room by
        # dropping a half-open connection of a largest holder)
        for n in range(20, 26):
            served.append(_connect(port, ctx, f"127.0.0.{n}"))
        assert the_gate.evicted == 6
        assert sum(_closed_within(s, 0.05) for s in hostile) == 6
        _wait(lambda: the_gate.connections == gate.MAX_CONNECTIONS)  # full again
        # a hostile client cannot take a slot back from its peers: with one more it would
        # hold as many as the largest holders
        again = next(s for s in HOSTILE if the_gate.held.get(s, 0) < PER_CLIENT)
        with socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(again, 0)
        ) as sock:
            assert _closed_within(sock, 10)  # refused
        assert the_gate.evicted == 6
        for tls in served:  # and the newcomers are served
            assert _get(tls).startswith(b"HTTP/1.1 200 "), "not served"
    finally:
        for sock in hostile:
            sock.close()
        for tls in served:
            tls.close()
