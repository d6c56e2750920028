"""The Redis hot path's connection-level timeout (tokensvc.redis.watchdog.Watchdog): no timer per
command, a silent server fails every command in flight on its connection, a cancelled
caller's late reply is never read as another command's."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import scaled
from tokensvc.redis.connection import redis_client
from tokensvc.redis.watchdog import Watchdog
from tokensvc.store import StoreUnavailable, guarded


async def _silent_server() -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """A loopback server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], held


def test_a_silent_server_fails_every_command_in_flight_within_the_timeout():
    async def main() -> None:
        server, port, held = await _silent_server()
        watchdog = Watchdog(0.4)
        dog = asyncio.create_task(watchdog.run())
        client = redis_client(f"redis://127.0.0.1:{port}/0", 0.4, watchdog)
        assert client.connection_pool.connection_kwargs["socket_timeout"] is None
        try:
            pipe = client.pipeline(transaction=False)
            pipe.get("a").get("b").get("c")
            # the watchdog ends them (a bound, not a timing assertion: without the watchdog
            # they would wait forever)
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    guarded(client.get, "x"), guarded(pipe.execute), return_exceptions=True
                ),
                scaled(3.0),
            )
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert watchdog.aborted >= 2  # one connection each, both closed
        finally:
            dog.cancel()
            await client.aclose()
            for writer in held:
                writer.close()
            server.close()

    asyncio.run(main())


def test_a_cancelled_callers_reply_is_discarded_and_the_connection_stays_in_step(redis_url):
    async def main() -> None:
        watchdog = Watchdog(5.0)
        dog = asyncio.create_task(watchdog.run())
        client = redis_client(redis_url, 5.0, watchdog)
        try:
            blocked = asyncio.create_task(client.blpop(["queue"], 2))
            await asyncio.sleep(0.2)
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
            # had the cancelled BLPOP stayed on the server, it would take this element,
            # or its reply would be read as the answer to a later command
            await client.rpush("queue", "first")
            await client.set("key", "value")
            assert await client.lpop("queue") == b"first"
            assert await client.get("key") == b"value"
            assert watchdog.aborted == 0
        finally:
            dog.cancel()
            await client.aclose()

    asyncio.run(main())


def test_without_a_watchdog_the_timeout_is_per_command():
    """Command-line tools (no watchdog task) keep redis-py's per-command socket timeout."""
    client = redis_client("redis://127.0.0.1:1/0", 0.5)
    assert client.connection_pool.connection_kwargs["socket_timeout"] == 0.5
    asyncio.run(client.aclose())
