"""Admission control in front of the HTTP listener: who may hold a connection, how long.

aiohttp parses HTTP well but counts nothing per client, and asyncio's TLS server hands a
connection to the protocol only after its handshake: ~300 half-open TLS connections from
one client used to take every slot. So this module accepts the TCP connections itself and,
before spending any TLS work:

* refuses (closes at once) a connection beyond :data:`MAX_PER_CLIENT` from one client --
  one IPv4 address, or one IPv6 /64 (one host's addresses);
* when :data:`MAX_CONNECTIONS` are held in all, still admits a client that would hold
  fewer than a holder with an *idle* connection: the largest such holder's oldest idle
  connection is dropped for it (17 clients holding 16 connections each must not lock every
  other sidecar out); only when no holder larger than the newcomer has one is it refused.
  Idle means no request in progress (:attr:`Handler.idle`): a TLS connection still in its
  handshake or waiting for its first request head, or any connection between requests (its
  response written, e.g. waiting for the client's TLS ``close_notify``, which asyncio
  otherwise waits 30 s for). A request in progress (from its parsed head until its
  response is written) is never cut, and the largest holders never evict each other. A
  plaintext connection (``--insecure`` or the metrics listener) that has not sent its
  first request keeps its slot until :data:`READ_TIMEOUT`;
* gives the TLS handshake :data:`HANDSHAKE_TIMEOUT` seconds;

then hands the (TLS) connection to aiohttp's protocol, whose keep-alive timer
(:data:`READ_TIMEOUT`, armed at connect) drops a client that has not sent its request head
in time. A slot is held from accept until the connection is closed. The constants are
module attributes so tests can lower them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger("tokensvc.http_jwks")

#: Connections held at once by one client (IPv4 address or IPv6 /64).
MAX_PER_CLIENT = 16
#: Connections held at once in all.
MAX_CONNECTIONS = 256
#: Seconds a client has to finish the TLS handshake.
HANDSHAKE_TIMEOUT = 5.0
#: Seconds from connect (after TLS) to a complete request head.
READ_TIMEOUT = 5.0
#: Seconds to keep reading (and dropping) input after a response, so that closing with
#: unread input does not reset the connection before the client has read the response.
LINGER_TIMEOUT = 1.0
_BACKLOG = 256


def client_of(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """The key a connection counts under: its IPv4 address, or its IPv6 /64."""
    ip = ipaddress.ip_address(address[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


class Handler(web.RequestHandler):
    """aiohttp's connection handler, telling the gate whether a request is in progress:
    from its parsed head until its response is written (aiohttp's ``_handle_request``
    spans exactly that), or parsed and waiting for its turn (pipelined)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_request = False
        #: requests answered on this connection
        self.requests = 0

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        self.in_request = True
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self.in_request = False
            self.requests += 1

    @property
    def idle(self) -> bool:
        """No request in progress and none parsed and waiting to be handled."""
        return not self.in_request and not getattr(self, "_messages", ())


class Server(web.Server):
    """aiohttp's low-level server, telling the gate when a connection ends."""

    handler_class: type[Handler] = Handler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ends: dict[web.RequestHandler, asyncio.Future[None]] = {}

    def __call__(self) -> Handler:
        return self.handler_class(self, loop=self._loop, **self._kwargs)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        end = self.ends.pop(handler, None)
        if end is not None and not end.done():
            end.set_result(None)


@dataclass(eq=False)
class _Slot:
    """An admitted connection as the gate sees it, until it ends or is evicted."""

    handler: Handler
    tls: bool
    #: the TLS handshake is done (plaintext: the transport is set up)
    opened: bool = False

    def evictable(self) -> bool:
        """No request in progress: a TLS connection in its handshake or before its first
        request, or any connection between requests (see the module doc)."""
        if not self.opened:
            return self.tls  # plaintext is "opening" only for an instant: no handshake
        return self.handler.idle and (self.tls or self.handler.requests > 0)

    def evict(self, task: asyncio.Task[None]) -> bool:
        """Drop the connection; False if it is already gone."""
        if not self.opened:
            task.cancel()  # in the handshake: its task closes the socket
            return True
        transport = self.handler.transport
        if transport is None:
            return False  # lost already: its slot is being released
        transport.abort()  # at once, also when closing: no close_notify to wait for
        return True


@dataclass
class Gate:
    """A listening socket feeding an aiohttp server."""

    server: Server
    sock: socket.socket
    context: ssl.SSLContext | None
    port: int = 0
    held: Counter[str] = field(default_factory=Counter)
    refused: int = 0
    evicted: int = 0
    _accepting: asyncio.Task[None] | None = None
    _opening: set[asyncio.Task[None]] = field(default_factory=set)
    #: per client, its connections not yet ended nor evicted, oldest first
    _slots: dict[str, dict[asyncio.Task[None], _Slot]] = field(default_factory=dict)

    @classmethod
    async def start(
        cls, server: Server, address: str, context: ssl.SSLContext | None, reuse_port: bool
    ) -> Gate:
        """Bind ``HOST:PORT`` and start accepting.

        Raises:
            OSError: the address cannot be bound.
        """
        host, _, port = address.rpartition(":")
        infos = await asyncio.get_running_loop().getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        sock = socket.create_server(
            sockaddr[:2], family=family, backlog=_BACKLOG, reuse_port=reuse_port
        )
        sock.setblocking(False)
        gate = cls(server, sock, context, port=sock.getsockname()[1])
        gate._accepting = asyncio.create_task(gate._accept())
        return gate

    @property
    def connections(self) -> int:
        """Connections held now (handshaking or served)."""
        return sum(self.held.values())

    async def stop(self) -> None:
        """Stop accepting, drop the connections still open, wait until all is closed."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        self.sock.close()
        for task in list(self._opening):
            task.cancel()
        await asyncio.gather(*self._opening, return_exceptions=True)
        self.server.pre_shutdown()
        await self.server.shutdown(LINGER_TIMEOUT)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self.sock)
            except OSError as err:  # e.g. out of file descriptors: back off, keep serving
                log.warning("HTTP listener cannot accept: %s", err)
                await asyncio.sleep(0.1)
                continue
            client = client_of(address)
            if self.held[client] >= MAX_PER_CLIENT or (
                self.connections >= MAX_CONNECTIONS and not self._evict_for(client)
            ):
                self.refused += 1
                conn.close()  # before any TLS work: refusing must stay cheap
                continue
            self.held[client] += 1
            slot = _Slot(self.server(), tls=self.context is not None)
            task = asyncio.create_task(self._open(conn, slot))
            self._opening.add(task)
            self._slots.setdefault(client, {})[task] = slot
            # released in a callback, not in _open: an evicted task may never have run
            task.add_done_callback(functools.partial(self._release, conn, client))

    def _evict_for(self, client: str) -> bool:
        """Make room for ``client`` in a full gate: drop the oldest idle connection (see
        the module doc) of the largest holder that has one, if that holder holds more than
        ``client`` would with one more (so the largest holders never evict each other).
        Returns whether one was dropped (its slot is released when its task ends, soon
        after)."""
        mine = self.held[client] + 1
        for holder in sorted(self._slots, key=lambda c: self.held[c], reverse=True):
            if self.held[holder] <= mine:
                return False
            slots = self._slots[holder]
            for task, slot in slots.items():
                if slot.evictable() and slot.evict(task):
                    del slots[task]
                    if not slots:
                        del self._slots[holder]
                    self.evicted += 1
                    return True
        return False

    def _release(self, conn: socket.socket, client: str, task: asyncio.Task[None]) -> None:
        """The connection of ``task`` has ended (served, failed, timed out, evicted)."""
        self._opening.discard(task)
        slots = self._slots.get(client)
        if slots is not None:
            slots.pop(task, None)
            if not slots:
                del self._slots[client]
        conn.close()  # a no-op when the transport closed it already
        self.held[client] -= 1
        if self.held[client] <= 0:
            del self.held[client]

    async def _open(self, conn: socket.socket, slot: _Slot) -> None:
        """Handshake (if TLS) and hand the connection to aiohttp; return when the
        connection ends however it ends (the slot is released by :meth:`_release`)."""
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        handler = slot.handler
        self.server.ends[handler] = closed
        try:
            await loop.connect_accepted_socket(
                lambda: handler,
                conn,
                ssl=self.context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if self.context is not None else None,
            )
            slot.opened = True  # evicted from now on by aborting its transport
            await closed
        except (OSError, ssl.SSLError, TimeoutError):
            conn.close()  # handshake failed or timed out
        finally:
            self.server.ends.pop(handler, None)
