"""The lean path on Redis Cluster (tokensvc.redis.lean_cluster), on a real cluster: scripts
of the server's cluster client bypass redis-py's command path and land on the primary of
their slot; a moved slot (MOVED) corrects the slot map and the call still succeeds; a slot
being migrated (ASK) is followed with ASKING; NOSCRIPT on a node loads the script there;
a lost connection fails what was in flight, re-sends nothing, and after a failover later
calls reach the new primary; a span per command when traced."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from redis.cluster import key_slot
from redis.exceptions import RedisClusterException

from tests.support import wait_until_async
from tests.support.topology import Cluster, client, paused_scripts, redis_cluster
from tokensvc.redis import lean
from tokensvc.redis.connection import LeanCluster
from tokensvc.redis.embedded import RedisProcess
from tokensvc.redis.lean import LeanScript, script_for
from tokensvc.redis.lean_cluster import LeanClusterScript
from tokensvc.redis.watchdog import Watchdog
from tokensvc.runtime.server import redis_client
from tokensvc.store import FamilyStore, StoreUnavailable, guarded
from tokensvc.store.calls import SLOT_RETRIES
from tokensvc.store.keyspace import RING_VERSION

# a write (so CLIENT PAUSE WRITE holds it) whose count shows how often it ran
_INCR = "return {KEYS[1], redis.call('INCR', KEYS[1])}"
_SLOW_INCR = "local n = 0 for i = 1, 300000 do n = n + i end return redis.call('INCR', KEYS[1])"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(tmp_path_factory.mktemp("leancluster"), masters=3) as started:
        yield started


@pytest.fixture
def fresh(cluster: Cluster) -> Cluster:
    cluster.flush()
    return cluster


def _servers_client(cluster: Cluster) -> LeanCluster:
    """The cluster client as the server builds it (with a watchdog)."""
    made = redis_client(cluster.url, 5.0, Watchdog(5.0))
    assert isinstance(made, LeanCluster) and made.lean is not None
    return made


def _key_on(cluster: Cluster, master: RedisProcess, prefix: str = "k") -> str:
    return next(
        f"{prefix}{i}" for i in range(100_000) if cluster.master_of(f"{prefix}{i}") is master
    )


def _value(proc: RedisProcess, key: str) -> bytes | None:
    """``key``'s value on ``proc`` itself (ASKING: also in a slot it is importing)."""
    with client(proc, single_connection_client=True) as conn:
        conn.execute_command("ASKING")
        value: bytes | None = conn.get(key)
        return value


def _pooled(made: LeanCluster) -> int:
    """Connections redis-py's own node pools have made."""
    return sum(len(node._connections) for node in made.nodes_manager.nodes_cache.values())


def test_the_servers_cluster_client_sends_scripts_lean_to_the_owner_of_their_slot(fresh):
    async def main() -> None:
        made = _servers_client(fresh)
        used: list[Any] = []
        redis_py = made.execute_command

        async def counted(*args: Any, **kwargs: Any) -> Any:
            used.append(args[0])
            return await redis_py(*args, **kwargs)

        made.execute_command = counted  # type: ignore[method-assign]
        try:
            script = script_for(made, _INCR)
            assert isinstance(script, LeanClusterScript) and isinstance(script, LeanScript)
            await script(keys=["warm-up"])  # initializes the slot map
            pooled = _pooled(made)
            keys = [f"spread-{i}" for i in range(300)]
            replies = await asyncio.gather(*(guarded(script, keys=[k]) for k in keys))
            assert replies == [[k.encode(), 1] for k in keys]
            assert used == []  # not one command through redis-py's cluster client
            assert _pooled(made) == pooled  # nor on its node pools
            # each key was written on the primary of its slot, and all primaries served
            for key in keys[:30]:
                assert _value(fresh.master_of(key), key) == b"1", key
            assert len({fresh.master_of(k).port for k in keys}) == len(fresh.masters)
            # every key of a script must share its slot (as redis-py checks); not sent
            a, b = (
                "a",
                next(f"b{i}" for i in range(99) if key_slot(f"b{i}".encode()) != key_slot(b"a")),
            )
            with pytest.raises(RedisClusterException, match="same key slot"):
                await script(keys=[a, b])
            # Introspect's reads (its ring version too, on another primary) go lean as well
            store = FamilyStore(made)
            await store.load_scripts()
            used.clear()
            state = await store.access_state("sid-unknown", "jti", 0)
            assert state.reason == "unknown_session" and state.ring_version == 0
            with fresh.client() as conn:
                conn.set(RING_VERSION, 7)
            assert (await store.access_state("sid-unknown", "jti", 0)).ring_version == 7
            assert used == []
            # the command-line tools' client (no watchdog) keeps redis-py's path
            plain = redis_client(fresh.url, 5.0)
            try:
                assert not isinstance(script_for(plain, _INCR), LeanScript)
            finally:
                await plain.aclose()
        finally:
            await made.aclose()

    asyncio.run(main())


def test_moved_corrects_the_slot_map_and_the_call_succeeds(fresh):
    async def main() -> None:
        made = _servers_client(fresh)
        try:
            script = script_for(made, _INCR)
            key = _key_on(fresh, fresh.masters[0], "moving")
            slot = key_slot(key.encode())
            assert await script(keys=[key]) == [key.encode(), 1]
            assert made.nodes_manager.slots_cache[slot][0].port == fresh.masters[0].port
            target = fresh.masters[1]
            await asyncio.to_thread(fresh.migrate, slot, target, lambda _: None)
            retried = sum(SLOT_RETRIES.values())
            # the old owner answers MOVED; the lean path follows it (no guarded() here)
            assert await script(keys=[key]) == [key.encode(), 2]  # ran once more, not twice
            assert made.nodes_manager.slots_cache[slot][0].port == target.port
            assert _value(target, key) == b"2"
            assert await script(keys=[key]) == [key.encode(), 3]  # straight there now
            assert sum(SLOT_RETRIES.values()) == retried
        finally:
            await made.aclose()

    asyncio.run(main())


def _setslot(proc: RedisProcess, *args: Any) -> None:
    with client(proc) as conn:
        conn.execute_command("CLUSTER SETSLOT", *args)


def test_ask_during_a_migration_sends_asking_with_the_command(fresh):
    async def main() -> None:
        made = _servers_client(fresh)
        try:
            script = script_for(made, _INCR)
            source, target = fresh.masters[2], fresh.masters[0]
            here = _key_on(fresh, source, "ask")
            slot = key_slot(here.encode())
            away = f"{{{here}}}-away"  # another key of the slot, not on the source
            assert await script(keys=[here]) == [here.encode(), 1]
            _setslot(target, slot, "IMPORTING", fresh.node_id(source))
            _setslot(source, slot, "MIGRATING", fresh.node_id(target))
            with client(target) as conn:
                conn.script_flush()  # NOSCRIPT on the target too: loaded there, sent again
            # a key still on the source is served there; a missing one is asked of the target
            assert await script(keys=[here]) == [here.encode(), 2]
            assert await script(keys=[away]) == [away.encode(), 1]
            assert await script(keys=[away]) == [away.encode(), 2]
            assert _value(target, away) == b"2"
            with client(source) as conn:  # the source has the key it had, no other
                assert conn.execute_command("CLUSTER GETKEYSINSLOT", slot, 10) == [here]
            assert made.nodes_manager.slots_cache[slot][0].port == source.port  # ASK: no move
            await asyncio.to_thread(fresh.migrate, slot, target, lambda _: None)
            assert await guarded(script, keys=[here]) == [here.encode(), 3]
        finally:
            await made.aclose()

    asyncio.run(main())


def test_noscript_on_a_node_loads_the_script_there_and_sends_it_again(fresh):
    async def main() -> None:
        made = _servers_client(fresh)
        try:
            script = script_for(made, "return {KEYS[1], redis.call('INCR', KEYS[1]), 'lean'}")
            key = _key_on(fresh, fresh.masters[1], "noscript")
            assert await script(keys=[key]) == [key.encode(), 1, b"lean"]
            with client(fresh.masters[1]) as conn:
                conn.script_flush()
            assert await script(keys=[key]) == [key.encode(), 2, b"lean"]  # ran once
            with client(fresh.masters[1]) as conn:
                assert conn.script_exists(script.sha) == [True]
        finally:
            await made.aclose()

    asyncio.run(main())


def test_a_lost_connection_fails_what_was_in_flight_and_resends_nothing(fresh):
    async def main() -> None:
        made = _servers_client(fresh)
        home = fresh.masters[1]
        key = _key_on(fresh, home, "lost")
        try:
            script = script_for(made, _INCR)
            await script(keys=["warm-up"])
            with client(home, decode_responses=True) as admin:
                admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
                try:
                    in_flight = [
                        asyncio.ensure_future(guarded(script, keys=[key])) for _ in range(6)
                    ]
                    # both lean connections to the node hold one, the rest queued behind
                    await wait_until_async(
                        lambda: len(paused_scripts(admin)) == 2,
                        what="the scripts to wait in Redis",
                    )
                    held = paused_scripts(admin)
                    for client_id in held:  # the lean connections holding them
                        admin.execute_command("CLIENT", "KILL", "ID", client_id)
                    outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
                finally:
                    admin.execute_command("CLIENT", "UNPAUSE")
            assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
            assert _value(home, key) is None  # none ran, none was sent again
            assert await guarded(script, keys=[key]) == [key.encode(), 1]
        finally:
            await made.aclose()

    asyncio.run(main())


@pytest.fixture
def failing_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of its own (its first master is killed): three masters, the first with a
    replica."""
    with redis_cluster(tmp_path / "failing", masters=3, replicas=1) as started:
        yield started


def test_after_a_failover_calls_reach_the_new_primary(failing_cluster):
    cluster = failing_cluster

    async def main() -> None:
        made = _servers_client(cluster)
        old = cluster.masters[0]
        key = _key_on(cluster, old, "failover")
        slot = key_slot(key.encode())
        try:
            script = script_for(made, _SLOW_INCR)
            assert await script(keys=[key]) == 1
            await asyncio.to_thread(cluster.sync_replicas)
            in_flight = [asyncio.ensure_future(guarded(script, keys=[key])) for _ in range(4)]
            await asyncio.sleep(0)  # written
            new = await asyncio.to_thread(cluster.take_over, old)  # SIGKILL, then promote
            outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
            # answered before the kill, or failed UNAVAILABLE; none is re-sent
            assert all(isinstance(o, int | StoreUnavailable) for o in outcomes), outcomes

            async def reached() -> Any:
                try:
                    return await guarded(script, keys=[key])
                except StoreUnavailable:  # the refresh is paced as redis-py paces it
                    return None

            count = await wait_until_async(reached, what="a call to reach the new primary")
            assert made.nodes_manager.slots_cache[slot][0].port == new.port
            with client(new) as conn:
                assert int(conn.get(key)) == count  # on the new primary
            # the dead primary's lean connections are gone
            assert made.lean is not None and old.port not in {
                int(name.rsplit(":", 1)[1]) for name in made.lean._primaries
            }
        finally:
            await made.aclose()

    asyncio.run(main())


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lean.trace_with(provider)
    try:
        yield provider, exporter
    finally:
        lean.trace_with(None)


def test_a_lean_cluster_command_has_a_redis_client_span_naming_its_node(fresh, traced):
    provider, exporter = traced
    key = _key_on(fresh, fresh.masters[2], "traced")

    async def main() -> None:
        made = _servers_client(fresh)
        try:
            with provider.get_tracer("test").start_as_current_span("rpc"):
                await script_for(made, _INCR)(keys=[key], args=["secret-arg"])
        finally:
            await made.aclose()

    asyncio.run(main())
    spans = {s.name: s for s in exporter.get_finished_spans()}
    span = spans["EVALSHA"]
    assert span.attributes is not None
    assert span.attributes["db.system"] == "redis"
    assert span.attributes["net.peer.port"] == fresh.masters[2].port
    assert span.parent is not None and span.parent.span_id == spans["rpc"].context.span_id
    assert "secret-arg" not in str(dict(span.attributes))
