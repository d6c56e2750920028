"""The lean path (:mod:`tokensvc.redis.lean`) for Redis Cluster: each hot script written on
a pipelined connection of our own to the primary of its keys' slot.

Why this exists: redis-py's cluster client spends more CPU per command than the single
server client (resolving the command's policies and keys, the retry loop, the per-node
pool, metrics hooks), more than the rest of an Introspect. Here a script costs a CRC16 of
its keys, a look-up in the client's own slot map, and a write on a :class:`~.lean._Pipe`;
its reply is read by that connection's reader task as on one server.

What is *not* duplicated is the cluster's state: the slot map, the nodes and their
refresh are redis-py's (``client.nodes_manager``); this module reads them and reports to
them as redis-py's own command path does. Per primary a few connections (see
:data:`~tokensvc.redis.lean.CONNECTIONS`) are made exactly as redis-py makes that node's
(the node's ``connection_class``, the watchdog's, and ``connection_kwargs``: AUTH/ACL and
the rest, no retry). Connections of a node that left the map, or is a primary no more,
are closed once their commands are answered.

The rules of :mod:`tokensvc.redis.lean` hold, and a command is still written once and
never re-sent after it may have run:

* Routing: the slot of the script's first key (all its keys must share it, as redis-py
  checks); a script without keys goes to any primary. The client is initialized (slot map
  fetched) first if it has not been, and refreshed first when an error asked for it and
  the refresh is due (redis-py's pacing).
* ``MOVED`` (the command did not run): the slot map is corrected (``move_slot``, and every
  ``reinitialize_steps`` MOVED a full refresh is asked for, as redis-py does) and the
  command sent to the new owner, at most :data:`REDIRECTIONS` times; then the error
  reaches :func:`tokensvc.store.guarded`, which retries a moving slot within the call's
  deadline.
* ``ASK`` (did not run): ``ASKING`` and the command are written together on a connection
  of the target; both replies are read in order, ``ASKING``'s dropped.
* ``TRYAGAIN``, ``CLUSTERDOWN`` (did not run): raised as redis-py's classes (its parser
  makes them), for :func:`~tokensvc.store.guarded` to treat as before; ``CLUSTERDOWN``
  also asks for a refresh of the slot map.
* ``NOSCRIPT`` (did not run): the script is loaded on that node once and sent again.
* A connection failure fails every command in flight on that connection
  (``ConnectionError``, UNAVAILABLE) and asks for a refresh of the slot map with the node
  tried last, as redis-py does: a later call reaches the primary that took over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import ScriptTextT

from tokensvc.redis import lean
from tokensvc.redis.lean import CONNECTIONS, LeanScript, _Pipe

#: MOVED/ASK followed per call before the error is left to the caller's retry.
REDIRECTIONS: Final = 5


class _Primary:
    """The lean connections to one primary."""

    __slots__ = ("_next", "make", "name", "peer", "pipes")

    def __init__(self, node: ClusterNode, connections: int) -> None:
        self.name = node.name
        self.pipes = [_Pipe() for _ in range(max(1, connections))]
        self._next = 0
        self.peer: dict[str, str | int] = {
            "db.system": "redis",
            "db.redis.database_index": 0,
            "net.peer.name": str(node.host),
            "net.peer.port": int(node.port),
        }

        def make() -> AbstractConnection:  # as ClusterNode.acquire_connection does
            kwargs = {
                **node.connection_kwargs,
                "retry": Retry(NoBackoff(), 0, supported_errors=(RedisConnectionError,)),
            }
            connection: AbstractConnection = node.connection_class(**kwargs)
            return connection

        self.make: Callable[[], AbstractConnection] = make

    def pipe(self) -> _Pipe:
        pipe = self.pipes[self._next]
        self._next = (self._next + 1) % len(self.pipes)
        return pipe

    async def send(self, args: tuple[Any, ...], *, asking: bool = False) -> Any:
        """Write ``args`` (after ``ASKING``, in the same write, if ``asking``) and return
        its reply."""
        pipe = self.pipe()
        conn = await pipe.ready(self.make)
        return await (pipe.send_asking(conn, args) if asking else pipe.send(conn, args))

    async def close_when_answered(self) -> None:
        """Close the connections once the commands in flight on them are answered."""
        try:
            while waiting := [f for pipe in self.pipes for f in pipe.waiting if not f.done()]:
                await asyncio.wait(waiting)
        finally:  # also when the link is closed meanwhile
            for pipe in self.pipes:
                await pipe.close()


class LeanClusterLink:
    """The lean connections of one :class:`~redis.asyncio.cluster.RedisCluster` client, per
    primary; see the module doc."""

    def __init__(self, client: RedisCluster, connections: int = CONNECTIONS) -> None:
        self.client = client
        self.nodes = client.nodes_manager
        self._connections = connections
        self._encode: Callable[[Any], bytes] = client.encoder.encode  # type: ignore[no-untyped-call,unused-ignore]
        self._primaries: dict[str, _Primary] = {}
        self._seen_slots: object = None  # the slot map the primaries were last pruned by
        self._retiring: set[asyncio.Task[None]] = set()
        self._refresh_due = _refresh_due(client)

    def script(self, script: AsyncScript) -> LeanClusterScript:
        """``script`` called through this link."""
        return LeanClusterScript(script, self)

    async def execute(
        self, keys: Sequence[Any], *args: Any, script: ScriptTextT | None = None
    ) -> Any:
        """Send one command on the primary of ``keys``' slot (any primary without keys)
        and return its reply (no response callbacks: EVALSHA has none); ``script``: the
        source to load on NOSCRIPT."""
        tracer = lean._tracer
        if tracer is not None and is_instrumentation_enabled():
            name = str(args[0])
            with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT) as span:
                if not span.is_recording():
                    return await self._execute(keys, args, script, None)
                span.set_attribute("db.statement", f"{name} {args[1]!s} ?")
                span.set_attribute("db.redis.args_length", len(args))
                return await self._execute(keys, args, script, span)
        return await self._execute(keys, args, script, None)

    async def _execute(
        self, keys: Sequence[Any], args: tuple[Any, ...], script: ScriptTextT | None, span: Any
    ) -> Any:
        client = self.client
        if self._refresh_due():
            await client.initialize()
        if self.nodes.slots_cache is not self._seen_slots:
            self._prune()
        slot = self._slot(keys)
        node = self._owner(slot)
        asking = loaded = load = False
        redirections = 0
        while True:
            primary = self._primary(node)
            if span is not None:
                span.set_attributes(primary.peer)
            try:
                if load:  # inside the try: its connection failure is the node's too
                    load = False
                    await primary.send(("SCRIPT", "LOAD", script))
                return await primary.send(args, asking=asking)
            except MovedError as err:  # (an AskError too: first)
                redirections += 1
                _fill_host(err, node)
                await self._moved(err)
                if redirections > REDIRECTIONS or slot is None:
                    raise
                node, asking = self._owner(slot), False
            except AskError as err:
                redirections += 1
                _fill_host(err, node)
                target = self.nodes.get_node(*self.nodes.remap_host_port(err.host, err.port))
                if target is None:  # a node the map does not know yet
                    _request_refresh(client)
                    raise
                if redirections > REDIRECTIONS:
                    raise
                node, asking = target, True
            except NoScriptError:  # it did not run: load it there once, send it again
                if loaded or script is None:
                    raise
                loaded = load = True
            except ClusterDownError:
                _request_refresh(client)
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                if not isinstance(err, AuthenticationError):  # as redis-py: not the node's
                    self.nodes.move_node_to_end_of_cached_nodes(node.name)
                    _request_refresh(client, failed=node.name)
                raise

    def _slot(self, keys: Sequence[Any]) -> int | None:
        if not keys:
            return None
        encode = self._encode
        slot = key_slot(encode(keys[0]))
        for key in keys[1:]:
            if key_slot(encode(key)) != slot:
                raise RedisClusterException("EVALSHA - all keys must map to the same key slot")
        return slot

    def _owner(self, slot: int | None) -> ClusterNode:
        """The primary serving ``slot`` (``None``: any primary), from the client's map."""
        if slot is None:
            return self.client.get_random_primary_node()
        try:
            node: ClusterNode = self.nodes.slots_cache[slot][0]
        except (KeyError, IndexError):
            _request_refresh(self.client)
            raise SlotNotCoveredError(f'Slot "{slot}" is not covered by the cluster.') from None
        return node

    def _primary(self, node: ClusterNode) -> _Primary:
        primary = self._primaries.get(node.name)
        if primary is None:
            primary = self._primaries[node.name] = _Primary(node, self._connections)
        return primary

    async def _moved(self, err: MovedError) -> None:
        """Correct the slot map as redis-py does after a MOVED."""
        client = self.client
        await self.nodes.move_slot(err)
        client.reinitialize_counter += 1
        steps = client.reinitialize_steps
        if steps and client.reinitialize_counter % steps == 0:
            client.reinitialize_counter = 0
            _request_refresh(client, also=self.nodes.remap_host_port(err.host, err.port))
        self._prune()  # a failover's MOVED turns the old primary into a replica

    def _prune(self) -> None:
        """Retire the connections of nodes that are no longer primaries in the map."""
        self._seen_slots = self.nodes.slots_cache
        cache = self.nodes.nodes_cache
        for name in list(self._primaries):
            node = cache.get(name)
            if node is None or node.server_type != PRIMARY:
                task = asyncio.create_task(self._primaries.pop(name).close_when_answered())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def aclose(self) -> None:
        primaries, self._primaries = list(self._primaries.values()), {}
        for primary in primaries:
            for pipe in primary.pipes:
                await pipe.close()
        retiring = list(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)


class LeanClusterScript(LeanScript):
    """A :class:`~tokensvc.redis.lean.LeanScript` on a :class:`LeanClusterLink`: sent to
    the primary of its keys' slot."""

    __slots__ = ("_cluster",)

    def __init__(self, script: AsyncScript, link: LeanClusterLink) -> None:
        self.script = script.script
        self.sha = script.sha
        self._cluster = link

    async def __call__(
        self, keys: Sequence[Any] | None = None, args: Iterable[Any] | None = None
    ) -> Any:
        keys = keys or ()
        command = ("EVALSHA", self.sha, len(keys), *keys, *(args or ()))
        return await self._cluster.execute(keys, *command, script=self.script)


def _fill_host(err: AskError, node: ClusterNode) -> None:
    """A redirection without a host (``cluster-preferred-endpoint-type unknown-endpoint``)
    means the host the command was sent to (as redis-py reads it)."""
    if not err.host:
        err.host = node.host
        err.node_addr = (err.host, err.port)


# redis-py's own refresh requests (private methods of redis-py 8, the floor pyproject.toml
# sets): the refresh runs before a later command, never as a re-send.


def _refresh_due(client: RedisCluster) -> Callable[[], bool]:
    """Whether ``client`` wants :meth:`~RedisCluster.initialize` before a command: never
    initialized, or a refresh was asked for and is due."""
    due: Callable[[], bool] = client._initialize_due
    return due


def _request_refresh(
    client: RedisCluster, *, failed: str | None = None, also: tuple[str, int] | None = None
) -> None:
    client._request_refresh(
        additional_startup_nodes_info=[also] if also is not None else None,
        last_failed_node_name=failed,
    )
