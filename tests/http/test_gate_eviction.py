"""Which connection a full gate drops for a newcomer: the oldest idle one (no request in
progress) of the largest holder that has one -- never a request in progress, never a
plaintext connection that has not sent its first request, never from a holder no larger
than the newcomer would be.

The gate in front of a real aiohttp server on loopback (plaintext, keep-alive answers, so
that connections can be idle between requests); its ``/slow`` request waits until the test
lets it answer. Clients at distinct loopback source addresses."""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.support import scaled, wait_until_async
from tokensvc.http import gate

A, B, C, D = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _connect(port: int, source: str) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


def _send(conn: Conn, path: str) -> None:
    conn[1].write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def _answer(conn: Conn) -> bytes:
    """One keep-alive answer (status line; the body is two bytes)."""
    head = await asyncio.wait_for(conn[0].readuntil(b"\r\n\r\n"), 10)
    await asyncio.wait_for(conn[0].readexactly(2), 10)
    return head.split(b"\r\n", 1)[0]


async def _closed(conn: Conn, seconds: float = 10.0) -> bool:
    """Whether the server closes ``conn`` (EOF or reset) within ``seconds`` (scaled)."""
    try:
        return await asyncio.wait_for(conn[0].read(1), scaled(seconds)) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


async def _scenario() -> None:
    release = asyncio.Event()

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/slow":
            await release.wait()
        return web.Response(text="ok")  # keep-alive: the connection stays, idle

    server = gate.Server(handle, keepalive_timeout=60.0, access_log=None)
    the_gate = await gate.Gate.start(server, "127.0.0.1:0", None, reuse_port=False)
    port = the_gate.port
    conns: list[Conn] = []

    async def held(n: int) -> None:
        await wait_until_async(lambda: the_gate.connections == n, what=f"{n} connections")

    try:
        # A holds its cap of 3: one request in progress, one fresh, one idle keep-alive
        a_busy, a_fresh, a_idle = [await _connect(port, A) for _ in range(3)]
        conns += [a_busy, a_fresh, a_idle]
        _send(a_busy, "/slow")
        _send(a_idle, "/")
        assert await _answer(a_idle) == b"HTTP/1.1 200 OK"
        # B holds 2 idle keep-alive connections: the gate (5 slots) is full
        b_old, b_new = [await _connect(port, B) for _ in range(2)]
        conns += [b_old, b_new]
        for conn in (b_old, b_new):
            _send(conn, "/")
            assert await _answer(conn) == b"HTTP/1.1 200 OK"
        await held(5)

        # a newcomer gets in: A, the largest holder, loses its idle connection, not the
        # request in progress nor the plaintext connection yet to send its request
        c = await _connect(port, C)
        conns.append(c)
        _send(c, "/")
        assert await _answer(c) == b"HTTP/1.1 200 OK"
        assert the_gate.evicted == 1
        assert await _closed(a_idle)
        assert not await _closed(a_busy, 0.2) and not await _closed(a_fresh, 0.2)
        await held(5)

        # another: A (2) has nothing idle left, so B (2) loses its oldest idle connection
        d = await _connect(port, D)
        conns.append(d)
        _send(d, "/")
        assert await _answer(d) == b"HTTP/1.1 200 OK"
        assert the_gate.evicted == 2
        assert await _closed(b_old)
        assert not await _closed(b_new, 0.2)
        await held(5)

        # C cannot evict: with one more it would hold as many as the largest holders
        again = await _connect(port, C)
        conns.append(again)
        assert await _closed(again)
        assert the_gate.refused == 1 and the_gate.evicted == 2

        # the request in progress was never cut, and the fresh connection is served
        release.set()
        assert await _answer(a_busy) == b"HTTP/1.1 200 OK"
        _send(a_fresh, "/")
        assert await _answer(a_fresh) == b"HTTP/1.1 200 OK"
    finally:
        for _, writer in conns:
            writer.close()
        await the_gate.stop()


def test_a_full_gate_evicts_only_idle_connections_of_a_larger_holder(monkeypatch):
    monkeypatch.setattr(gate, "MAX_PER_CLIENT", 3)
    monkeypatch.setattr(gate, "MAX_CONNECTIONS", 5)
    asyncio.run(_scenario())
