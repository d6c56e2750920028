"""Review: a full JWKS gate admits a new client only by dropping a connection still in its
TLS handshake. Connections past the handshake -- kept alive with one ordinary GET per
``READ_TIMEOUT`` (5 s by default), about 50 requests a second for every slot of a default
gate -- are never evicted, so 16 addresses (IPv4 addresses or IPv6 /64s: one /56 has 256)
holding their cap of keep-alive connections lock every other verifier out of the JWKS.

A real tokensvc with the HTTPS listener on loopback, the gate's limits lowered (as in
tests/http/test_http_gate_full.py); clients at distinct loopback source addresses.
READ_TIMEOUT is raised so the test need not send its keep-alive requests."""

from __future__ import annotations

import ssl

import pytest

from tests.http.test_http_gate_full import _connect, _get, _wait
from tests.http.test_http_jwks import JWKS, _client_context, http_port
from tokensvc.http import gate

HOSTILE = [f"127.0.0.{n}" for n in range(2, 19)]  # 17 clients
PER_CLIENT = 2


def _keep_alive(tls: ssl.SSLSocket) -> None:
    """One complete keep-alive GET: the connection is past its handshake and idle."""
    tls.sendall(b"GET " + JWKS.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += tls.recv(65536)
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += tls.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 ")


@pytest.mark.xfail(
    strict=True,
    reason="review finding (unfixed): idle keep-alive connections of the largest "
    "holders are never evicted from a full JWKS gate",
)
def test_keep_alive_holders_do_not_lock_a_new_client_out(
    make_settings, start_server, dev_pki, monkeypatch
):
    monkeypatch.setattr(gate, "MAX_PER_CLIENT", PER_CLIENT)
    monkeypatch.setattr(gate, "MAX_CONNECTIONS", len(HOSTILE) * PER_CLIENT)
    monkeypatch.setattr(gate, "READ_TIMEOUT", 60.0)  # stands for a GET every few seconds
    issued = dev_pki["server"]
    srv = start_server(
        make_settings(
            insecure=False, tls_cert=issued.cert, tls_key=issued.key, http_listen="127.0.0.1:0"
        )
    )
    port = http_port(srv)
    assert srv.running.http is not None and srv.running.http.gate is not None
    the_gate = srv.running.http.gate
    ctx = _client_context(issued.ca)
    hostile: list[ssl.SSLSocket] = []
    newcomer: ssl.SSLSocket | None = None
    try:
        for source in HOSTILE:
            for _ in range(PER_CLIENT):
                tls = _connect(port, ctx, source)
                _keep_alive(tls)
                hostile.append(tls)
        _wait(lambda: the_gate.connections == gate.MAX_CONNECTIONS)
        try:
            newcomer = _connect(port, ctx, "127.0.0.20")
            answer = _get(newcomer)
        except (OSError, ssl.SSLError) as err:
            answer = repr(err).encode()
        assert answer.startswith(b"HTTP/1.1 200 "), (answer[:80], the_gate.refused)
    finally:
        for tls in hostile:
            tls.close()
        if newcomer is not None:
            newcomer.close()
