"""Rows rpc.issue.cluster and rpc.introspect.cluster: Issue and Introspect under the
standard load with ``--redis-url redis+cluster://`` on a one-node Redis Cluster that serves
every slot, so the rows differ from rpc.issue and rpc.introspect only by the Cluster client
path (the slot routing of the lean path, :mod:`tokensvc.redis.lean_cluster`, and the
feed events appended apart from the scripts); each is interleaved with the no-op as usual."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from bench.run import Bench
from bench.service_rows import issue_request
from tokensvc.redis.embedded import RedisProcess, free_port
from tokensvc_client.v1 import tokensvc_pb2 as pb

ROWS = ("rpc.issue.cluster", "rpc.introspect.cluster")
SLOTS = 16384


def _bus_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port + 10000))  # the cluster bus port
        except OSError:
            return False
    return True


@contextlib.contextmanager
def one_node_cluster(data_dir: Path) -> Iterator[str]:
    """A Redis Cluster of one primary serving every slot; yields its ``redis+cluster`` URL."""
    port = next(p for p in iter(free_port, None) if p + 10000 < 65536 and _bus_free(p))
    proc = RedisProcess(
        data_dir,
        port=port,
        extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
    ).start()
    try:
        with redis.Redis(port=port) as conn:
            conn.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, SLOTS - 1)
            deadline = time.monotonic() + 30
            while b"cluster_state:ok" not in conn.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the bench's one-node cluster did not come up")
                time.sleep(0.05)
        yield f"redis+cluster://127.0.0.1:{port}"
    finally:
        proc.stop()


def run(b: Bench) -> None:
    n = b.n(4000)
    issue = issue_request()
    with (
        one_node_cluster(Path(b.data_dir) / "cluster") as url,
        b.serve("--redis-url", url) as server,
    ):
        b.measure("rpc.issue.cluster", server, "Issue", [issue] * n)
        reply = b.load(
            server.target, "/tokensvc.v1.TokenService/Issue", [issue], procs=1, keep_replies=True
        )
        access = pb.IssueResponse.FromString(reply.replies[0]).tokens.access_token
        req = pb.IntrospectRequest(token=access).SerializeToString()
        b.measure("rpc.introspect.cluster", server, "Introspect", [req] * n)
