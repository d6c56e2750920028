"""Review (fixed): a full JWKS gate admitted a new client only by dropping a connection
still in its TLS handshake. Connections past the handshake that had been served -- the
response written, the client never sending its TLS ``close_notify``, held up to asyncio's
30 s TLS shutdown timeout; or kept alive between requests -- were never evicted, so 16
addresses (IPv4 addresses or IPv6 /64s: one /56 has 256) holding their cap of them locked
every other verifier out of the JWKS. Now the largest holder's oldest idle connection (no
request in progress) makes room (tests/http/test_gate_eviction.py covers which one).

A real tokensvc with the HTTPS listener on loopback, the gate's limits lowered (as in
tests/http/test_http_gate_full.py); clients at distinct loopback source addresses.
READ_TIMEOUT is raised so the test need not send its keep-alive requests."""

from __future__ import annotations

import socket
import ssl

from tests.http.test_http_gate_full import _connect, _get, _wait
from tests.http.test_http_jwks import JWKS, _client_context, _closed_within, http_port
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
        # one served, idle connection of a largest holder made room for it
        assert the_gate.evicted == 1 and the_gate.refused == 0
        _wait(lambda: the_gate.connections == gate.MAX_CONNECTIONS)  # full again
        # (the hostile sockets all read the server's close_notify: count on the gate's side)
        assert sorted(the_gate.held.get(s, 0) for s in HOSTILE) == [1] + [PER_CLIENT] * 16
        # and a hostile client cannot take a slot back from its peers: with one more it
        # would hold as many as the largest holders
        again = next(s for s in HOSTILE if the_gate.held.get(s, 0) < PER_CLIENT)
        with socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(again, 0)
        ) as sock:
            assert _closed_within(sock, 10)  # refused
        assert the_gate.evicted == 1 and the_gate.refused == 1
    finally:
        for tls in hostile:
            tls.close()
        if newcomer is not None:
            newcomer.close()
