"""A lean path to Redis for the hot scripts: EVALSHA on a pipelined redis-py connection.

Why this exists: per command, redis-py's client layer (a pool checkout and release, the
retry wrapper, the event dispatch, the response callbacks) costs more CPU than the rest of
an Introspect. The hot scripts (Issue, Refresh, Introspect, Revoke, the rate limits, the
audit batches) are called through a :class:`LeanScript` instead: the command is packed by
hiredis's ``pack_command`` (C; redis-py's own packing of an EVALSHA costs ~12 µs, hiredis's
~2 µs, and refuses the same types: not str, int, float or bytes), written at once on a
connection this module owns, and its reply read by that connection's own parser
(``read_response``, hiredis's) in a reader task that answers the callers in order. Several
calls are in flight on one connection at a time (pipelining); nothing else of redis-py's
client runs. Everything else (admin commands, pipelines, the feed reader, the CLI) keeps
redis-py's client.

The connections are made by the client's own pool (``make_connection``), so they are
what redis-py would have used: TLS and AUTH/ACL from the URL, a Sentinel-managed
connection that asks the sentinels for the primary on every (re)connect and turns
READONLY from a demoted primary into a connection error, and the watchdog's class (the
per-connection timeout of :mod:`tokensvc.redis.watchdog`, which counts the commands sent
and the replies read). Redis Cluster has its own link, :mod:`tokensvc.redis.lean_cluster`:
the same pipes, one set per primary, routed by redis-py's own slot map.

The rules are those of :mod:`tokensvc.redis.connection`:

* A command is written once and never re-sent. If the connection fails (or the watchdog
  closes it for silence) every command in flight on it fails with ``ConnectionError``
  (:func:`tokensvc.store.guarded` makes that UNAVAILABLE); the next call connects anew.
* An error reply (``ResponseError``) answers its own command only; the connection stays
  in step. ``NOSCRIPT`` (the script did not run) loads the script once and sends it again.
* A caller cancelled while waiting leaves its place in the queue: its reply is read and
  dropped, so no later caller ever reads it.
* When traces are exported (:func:`trace_with`), each command gets a client span like
  opentelemetry-instrumentation-redis's (which only sees redis-py's client methods).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from hiredis import pack_command
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from tokensvc.redis.watchdog import Watched

#: Connections per client the hot scripts are spread over (each pipelines its calls).
CONNECTIONS = 2

_tracer: trace.Tracer | None = None


def trace_with(provider: trace.TracerProvider | None) -> None:
    """Give lean commands spans from ``provider`` (``None``: no spans); the server calls
    this where it instruments redis-py."""
    global _tracer
    _tracer = provider.get_tracer("tokensvc.redis.lean") if provider is not None else None


class _Pipe:
    """One connection of a :class:`LeanLink`: commands written in order, replies read in
    order by one reader task."""

    __slots__ = ("_closed", "_connecting", "_reader", "conn", "waiting")

    def __init__(self) -> None:
        self.conn: AbstractConnection | None = None
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()
        # closed for good (its link closed, or its Cluster node retired): never reconnects,
        # so a caller that was connecting meanwhile cannot leave a connection nobody owns
        self._closed = False

    async def ready(self, make: Callable[[], AbstractConnection]) -> AbstractConnection:
        """The open connection, or a new one from ``make`` (made as redis-py would: by the
        client's pool, or for a cluster node by its connection class and arguments)."""
        conn = self.conn
        if conn is not None and conn.is_connected:
            return conn
        async with self._connecting:
            conn = self.conn
            if conn is not None and conn.is_connected:
                return conn
            if self._closed:
                raise RedisConnectionError("connection closed")
            fresh = make()
            try:
                await fresh.connect()  # type: ignore[no-untyped-call]
                if self._closed:  # closed while connecting
                    raise RedisConnectionError("connection closed")
            except BaseException:
                await fresh.disconnect(nowait=True)
                raise
            self.conn = fresh
            self.waiting = collections.deque()
            self._reader = asyncio.create_task(self._read(fresh, self.waiting))
            return fresh

    def send(self, conn: AbstractConnection, *commands: tuple[Any, ...]) -> asyncio.Future[Any]:
        """Write ``commands`` now, in one write (no await between the write and its place
        in the queue); the future is the first one's reply (a caller with several queues
        the others' futures at once)."""
        writer = getattr(conn, "_writer", None)
        if writer is None or writer.transport.is_closing() or conn is not self.conn:
            raise RedisConnectionError("Connection closed before write")
        packed = b"".join([pack_command(command) for command in commands])
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        if isinstance(conn, Watched):  # the watchdog counts commands sent
            conn.sent += len(commands)
        writer.write(packed)
        return future

    def send_asking(
        self, conn: AbstractConnection, command: tuple[Any, ...]
    ) -> asyncio.Future[Any]:
        """Write ``ASKING`` and then ``command`` in one write (Redis Cluster, after an ASK
        redirection); the future is the command's reply, ``ASKING``'s is dropped."""
        asking = self.send(conn, ("ASKING",), command)
        asking.add_done_callback(_dropped)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)  # no await since the write: the next reply is its
        return future

    async def _read(
        self, conn: AbstractConnection, waiting: collections.deque[asyncio.Future[Any]]
    ) -> None:
        """Answer the callers of ``conn`` in order until it fails; then fail the rest."""
        failure: BaseException
        try:
            while True:
                try:
                    reply = await conn.read_response()
                except ResponseError as err:  # this command's own error; still in step
                    if not waiting:
                        raise RedisConnectionError("reply without a command") from err
                    future = waiting.popleft()
                    if not future.done():
                        future.set_exception(err)
                    continue
                if not waiting:  # a reply nobody asked for: out of step, give up
                    raise RedisConnectionError("reply without a command")
                future = waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except asyncio.CancelledError:
            failure = RedisConnectionError("connection closed")
            raise
        except Exception as err:
            failure = (
                err
                if isinstance(err, RedisConnectionError)
                else RedisConnectionError(f"connection failed: {type(err).__name__}: {err}")
            )
        finally:
            if self.conn is conn:
                self.conn = None
            while waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_exception(failure)
                    # a caller that gave up meanwhile does not read it: no "never retrieved"
                    future.exception()
            await conn.disconnect(nowait=True)

    async def close(self) -> None:
        """Close for good (see ``_closed``)."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)


def _dropped(future: asyncio.Future[Any]) -> None:
    """Read a dropped reply's outcome (no "exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


class LeanLink:
    """The lean connections of one redis-py client (one server or Sentinel; Cluster:
    :class:`~tokensvc.redis.lean_cluster.LeanClusterLink`); see the module doc."""

    def __init__(self, client: aioredis.Redis, connections: int = CONNECTIONS) -> None:
        self.client = client
        self.pool = client.connection_pool
        self._make: Callable[[], AbstractConnection] = self.pool.make_connection
        self._pipes = [_Pipe() for _ in range(max(1, connections))]
        self._next = 0
        kwargs = self.pool.connection_kwargs
        self._peer: dict[str, str | int] = {
            "db.system": "redis",
            "db.redis.database_index": int(kwargs.get("db", 0) or 0),
        }
        if "host" in kwargs:
            self._peer["net.peer.name"] = str(kwargs["host"])
            self._peer["net.peer.port"] = int(kwargs.get("port", 6379))

    async def execute(self, *args: Any) -> Any:
        """Send one command on a lean connection and return its reply (as redis-py's
        client would, without response callbacks: EVALSHA has none)."""
        tracer = _tracer
        if tracer is not None and is_instrumentation_enabled():
            name = str(args[0])
            with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
                if span.is_recording():
                    span.set_attributes(self._peer)
                    span.set_attribute("db.statement", f"{name} {args[1]!s} ?")
                    span.set_attribute("db.redis.args_length", len(args))
                return await self._execute(args)
        return await self._execute(args)

    async def _execute(self, args: tuple[Any, ...]) -> Any:
        pipe = self._pipes[self._next]
        self._next = (self._next + 1) % len(self._pipes)
        conn = await pipe.ready(self._make)
        return await pipe.send(conn, args)

    def script(self, script: AsyncScript) -> LeanScript:
        """``script`` called through this link."""
        return LeanScript(script, self)

    async def aclose(self) -> None:
        for pipe in self._pipes:
            await pipe.close()


class LeanScript:
    """An :class:`~redis.commands.core.AsyncScript` called through a :class:`LeanLink`
    (same call: ``await script(keys=..., args=...)``; ``.script`` and ``.sha`` too)."""

    __slots__ = ("_link", "script", "sha")

    def __init__(self, script: AsyncScript, link: LeanLink) -> None:
        self.script = script.script
        self.sha = script.sha
        self._link = link

    async def __call__(
        self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None
    ) -> Any:
        keys = keys or ()
        command = ("EVALSHA", self.sha, len(keys), *keys, *(args or ()))
        try:
            return await self._link.execute(*command)
        except NoScriptError:  # it did not run: load it once and send it again
            await self._link.execute("SCRIPT", "LOAD", self.script)
            return await self._link.execute(*command)


#: What :func:`script_for` returns (a Cluster link's scripts are LeanScripts too).
Script: TypeAlias = AsyncScript | LeanScript


def script_for(client: Any, source: str) -> Script:
    """``client.register_script(source)``, through the client's lean link if it has one
    (a :class:`LeanLink`, or for Redis Cluster a
    :class:`~tokensvc.redis.lean_cluster.LeanClusterLink`)."""
    script: AsyncScript = client.register_script(source)
    link = getattr(client, "lean", None)
    if link is None:
        return script
    lean_script: LeanScript = link.script(script)
    return lean_script
