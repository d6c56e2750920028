"""Timeouts are per connection, not per command: a client made with a :class:`Watchdog`
sets no socket timeout (redis-py would then wrap every command in a timer task and a
timeout context, the largest cost of a round trip); instead the watchdog's task looks at
every connection twice per timeout and closes one that has commands in flight and has
neither sent nor received anything for a whole timeout. Every command in flight on it then
fails (``ConnectionError``, so UNAVAILABLE), and the next command gets a new connection.
A cancelled caller's connection is closed by redis-py itself, so its late reply is never
read as someone else's.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, TypeVar, cast

from redis.asyncio.connection import AbstractConnection

_Conn = TypeVar("_Conn", bound=AbstractConnection)


class Watched:
    """Mixed into a redis-py connection class: counts commands sent and replies read, so
    the :class:`Watchdog` can tell a connection waiting on a silent server. Two integer
    increments per command; no timer."""

    watchdog: Watchdog
    sent = 0
    received = 0
    _seen = (0, 0)
    _stalled = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watchdog.watch(self)

    def pack_command(self, *args: Any) -> Any:  # pack_commands calls it for each command
        self.sent += 1
        return super().pack_command(*args)  # type: ignore[misc]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.received += 1

    async def disconnect(self, *args: Any, **kwargs: Any) -> None:
        self.sent = self.received = 0  # whatever was in flight failed with the connection
        await super().disconnect(*args, **kwargs)  # type: ignore[misc]

    def stalled(self, interval: float) -> float:
        """Seconds this connection has waited with commands in flight and no traffic, as
        seen by checks ``interval`` apart."""
        now = (self.sent, self.received)
        if self.sent > self.received and now == self._seen:
            self._stalled += interval
        else:
            self._stalled = 0.0
        self._seen = now
        return self._stalled

    def abort(self) -> None:
        """Close the socket at once: every read in flight fails with ConnectionError."""
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.transport.abort()


class Watchdog:
    """The per-connection timeout of the clients made with it: run :meth:`run` as a task
    for as long as they are used."""

    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self._connections: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}
        self.aborted = 0  # connections closed for silence, since start

    def watch(self, connection: Watched) -> None:
        self._connections.add(connection)

    def connection_class(self, base: type[_Conn]) -> type[_Conn]:
        """``base`` (a redis-py connection class) watched by this watchdog."""
        if base not in self._classes:
            attrs = {"watchdog": self, "__module__": __name__}
            self._classes[base] = type(f"Watched{base.__name__}", (Watched, base), attrs)
        return cast(type[_Conn], self._classes[base])

    def check(self, interval: float) -> None:
        """One look at every connection (the task calls this every ``interval`` s)."""
        for connection in list(self._connections):
            if connection.stalled(interval) >= self.timeout:
                self.aborted += 1
                connection.abort()

    async def run(self) -> None:
        interval = self.timeout / 2
        while True:
            await asyncio.sleep(interval)
            self.check(interval)
