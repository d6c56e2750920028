"""The lean path of the hot scripts (tokensvc.redis.lean): pipelined EVALSHA on the
watched client's own connections, with the watchdog's rules -- a silent server fails every
command in flight, a cancelled caller's reply is dropped in step, NOSCRIPT reloads once,
a lost connection fails what was in flight and the next call reconnects -- and a span per
command when traces are exported."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.exceptions import ResponseError

from tests.support import scaled
from tokensvc.redis import lean
from tokensvc.redis.connection import redis_client
from tokensvc.redis.lean import LeanScript, script_for
from tokensvc.redis.watchdog import Watchdog
from tokensvc.store import StoreUnavailable, guarded

_ECHO = "return {KEYS[1], ARGV[1]}"
_SLOW_ECHO = "local n = 0 for i = 1, 200000 do n = n + i end return {KEYS[1], ARGV[1]}"


def _watched(url: str, timeout: float = 5.0) -> tuple[object, Watchdog]:
    watchdog = Watchdog(timeout)
    return redis_client(url, timeout, watchdog), watchdog


def test_the_servers_client_calls_scripts_on_the_lean_path_in_order(redis_url):
    async def main() -> None:
        client, _ = _watched(redis_url)
        try:
            script = script_for(client, _ECHO)
            assert isinstance(script, LeanScript)
            replies = await asyncio.gather(
                *(guarded(script, keys=[f"k{i}"], args=[i]) for i in range(200))
            )
            assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
            # the CLI's client (no watchdog) keeps redis-py's own path
            plain = redis_client(redis_url, 5.0)
            try:
                assert not isinstance(script_for(plain, _ECHO), LeanScript)
            finally:
                await plain.aclose()
        finally:
            await client.aclose()

    asyncio.run(main())


def test_an_error_reply_answers_its_own_command_only(redis_url):
    async def main() -> None:
        client, _ = _watched(redis_url)
        try:
            good = script_for(client, _ECHO)
            bad = script_for(client, "return redis.error_reply('ERR nope')")
            outcomes = await asyncio.gather(
                good(keys=["a"], args=[1]), bad(), good(keys=["b"], args=[2]),
                return_exceptions=True,
            )  # fmt: skip
            assert outcomes[0] == [b"a", b"1"] and outcomes[2] == [b"b", b"2"]
            assert isinstance(outcomes[1], ResponseError) and "nope" in str(outcomes[1])
        finally:
            await client.aclose()

    asyncio.run(main())


def test_noscript_loads_the_script_once_and_sends_it_again(redis_url):
    async def main() -> None:
        client, _ = _watched(redis_url)
        try:
            script = script_for(client, "return 'lean-noscript-' .. ARGV[1]")
            await client.script_flush()
            assert await script(args=["x"]) == b"lean-noscript-x"
            assert (await client.script_exists(script.sha)) == [True]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_cancelled_callers_reply_is_dropped_in_step(redis_url):
    async def main() -> None:
        client, _ = _watched(redis_url)
        try:
            slow = script_for(client, _SLOW_ECHO)
            echo = script_for(client, _ECHO)
            for i in range(20):
                waiting = asyncio.ensure_future(slow(keys=["slow"], args=[i]))
                await asyncio.sleep(0)  # written, not answered yet
                waiting.cancel()
                # the next calls on the same connections get their own replies
                replies = await asyncio.gather(
                    echo(keys=["a"], args=[i]), echo(keys=["b"], args=[i])
                )
                assert replies == [[b"a", str(i).encode()], [b"b", str(i).encode()]]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_lost_connection_fails_what_was_in_flight_and_the_next_call_reconnects(redis_url):
    async def main() -> None:
        client, watchdog = _watched(redis_url)
        try:
            script = script_for(client, _SLOW_ECHO)
            assert isinstance(script, LeanScript)
            await asyncio.gather(*(script(keys=["x"], args=[0]) for _ in range(4)))
            in_flight = [
                asyncio.ensure_future(guarded(script, keys=["x"], args=[1])) for _ in range(6)
            ]
            await asyncio.sleep(0)
            for connection in list(watchdog._connections):  # as the watchdog does: abort
                connection.abort()
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            # every one in flight fails UNAVAILABLE; none is re-sent
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert await guarded(script, keys=["y"], args=[2]) == [b"y", b"2"]
        finally:
            await client.aclose()

    asyncio.run(main())


async def _silent_server() -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], held


def test_a_silent_server_fails_every_lean_command_in_flight():
    async def main() -> None:
        server, port, held = await _silent_server()
        client, watchdog = _watched(f"redis://127.0.0.1:{port}/0", 0.4)
        dog = asyncio.create_task(watchdog.run())
        try:
            script = script_for(client, _ECHO)
            outcomes = await asyncio.wait_for(
                asyncio.gather(
                    *(guarded(script, keys=["k"], args=[i]) for i in range(5)),
                    return_exceptions=True,
                ),
                scaled(3.0),
            )
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert watchdog.aborted >= 1
        finally:
            dog.cancel()
            await client.aclose()
            for writer in held:
                writer.close()
            server.close()

    asyncio.run(main())


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lean.trace_with(provider)
    try:
        yield provider, exporter
    finally:
        lean.trace_with(None)


def test_a_lean_command_has_a_redis_client_span_when_traced(redis_url, traced):
    provider, exporter = traced

    async def main() -> None:
        client, _ = _watched(redis_url)
        try:
            with provider.get_tracer("test").start_as_current_span("rpc"):
                await script_for(client, _ECHO)(keys=["k"], args=["secret-arg"])
        finally:
            await client.aclose()

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans["EVALSHA"]
    assert span.attributes["db.system"] == "redis"
    assert span.parent is not None and span.parent.span_id == spans["rpc"].context.span_id
    assert "secret-arg" not in str(dict(span.attributes))


def test_a_connection_closed_while_connecting_is_not_kept(redis_url):
    """A lean connection whose pipe is closed for good (its link closed, its Cluster node
    retired) while a caller was still connecting is disconnected, not left open with a
    reader task nobody owns."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tokensvc.redis.lean import _Pipe

    async def main() -> None:
        gate = asyncio.Event()
        made: list[Connection] = []

        class HeldConnection(Connection):
            async def connect(self) -> None:  # a real connection, held back until told
                await gate.wait()
                await super().connect()

        def make() -> Connection:
            port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
            made.append(HeldConnection(host="127.0.0.1", port=port))
            return made[-1]

        pipe = _Pipe()
        connecting = asyncio.create_task(pipe.ready(make))
        await asyncio.sleep(0)  # the caller is inside connect()
        await pipe.close()
        gate.set()
        with pytest.raises(RedisConnectionError):
            await connecting
        assert pipe.conn is None and not made[0].is_connected
        with pytest.raises(RedisConnectionError):  # and it never connects again
            await pipe.ready(make)
        assert len(made) == 1

    asyncio.run(main())
