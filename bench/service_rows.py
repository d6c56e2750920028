"""Rows rpc.*: the service's RPCs under the standard load, each with the server's CPU per
request, and Issue with one worker and with two from the same load shape. Introspect also
gets ``per_2_cores``: 2 s ÷ its server CPU per request, the rate two dedicated cores would
serve, set against Ory Hydra's published 5 109/s on 2 CPUs."""

from __future__ import annotations

from bench.run import Bench, Target
from tokensvc_client.v1 import tokensvc_pb2 as pb

ROWS = (
    "rpc.getkeys",
    "rpc.issue",
    "rpc.refresh",
    "rpc.introspect",
    "rpc.issue.workers_1",
    "rpc.issue.workers_2",
)
NOOP = "limit.grpc_noop"
#: Ory Hydra's published introspection rate on 2 CPUs (in-memory store), requests/s
HYDRA_INTROSPECT_2_CPUS = 5109
TARGETS = [
    Target("rpc.getkeys", NOOP, "server_cpu_us", at_most=1.3),
    Target("rpc.getkeys", NOOP, at_least=0.75),
    Target("rpc.introspect", NOOP, at_least=0.6),
    Target("rpc.introspect", NOOP, "server_cpu_us", at_most=1.7),
    # 2 s of server CPU per second on two dedicated cores, over the CPU of one Introspect
    Target("rpc.introspect", "", "per_2_cores", at_least=HYDRA_INTROSPECT_2_CPUS),
    Target("rpc.issue", NOOP, at_least=0.4),
    Target("rpc.issue", NOOP, "server_cpu_us", at_most=2.8),
    Target("rpc.refresh", NOOP, at_least=0.4),
    Target("rpc.refresh", NOOP, "server_cpu_us", at_most=2.8),
    Target("rpc.issue.workers_2", "rpc.issue.workers_1", at_least=1.25),
    # Keycloak publishes 120 refreshes/s per vCPU: fifteen times that per core of server CPU
    Target("rpc.refresh", "", "refresh_per_core", at_least=1800),
]


def issue_request() -> bytes:
    return pb.IssueRequest(
        subject="bench-user", roles=["reader"], client_id="bench"
    ).SerializeToString()


def run(b: Bench) -> None:
    n = b.n(4000)
    issue = issue_request()
    with b.serve() as server:
        b.measure("rpc.getkeys", server, "GetKeys", [b""] * b.n(8000))

        result = b.measure("rpc.issue", server, "Issue", [issue] * n, keep_replies=True)
        pairs = [pb.IssueResponse.FromString(r).tokens for r in result.replies]

        refresh = [
            pb.RefreshRequest(refresh_token=p.refresh_token).SerializeToString() for p in pairs
        ]
        b.measure("rpc.refresh", server, "Refresh", refresh)
        row = b.rows["rpc.refresh"]
        if row.get("server_cpu_us"):
            row["refresh_per_core"] = round(1e6 / row["server_cpu_us"], 1)

        reply = b.load(
            server.target, "/tokensvc.v1.TokenService/Issue", [issue], procs=1, keep_replies=True
        )
        access = pb.IssueResponse.FromString(reply.replies[0]).tokens.access_token
        req = pb.IntrospectRequest(token=access).SerializeToString()
        b.measure("rpc.introspect", server, "Introspect", [req] * n)
        row = b.rows["rpc.introspect"]
        if row.get("server_cpu_us"):  # Introspects per second two dedicated cores could serve
            row["per_2_cores"] = round(2e6 / row["server_cpu_us"], 1)
        check = b.load(
            server.target, "/tokensvc.v1.TokenService/Introspect", [req], procs=1, keep_replies=True
        )
        if not pb.IntrospectResponse.FromString(check.replies[0]).active:
            raise RuntimeError(
                "benchmark token is not active: the Introspect row measured failures"
            )

    # the same load shape against one worker and two: SO_REUSEPORT spreads the connections
    for workers in (1, 2):
        with b.serve(workers=workers) as server:
            b.measure(f"rpc.issue.workers_{workers}", server, "Issue", [issue] * n)
            b.rows[f"rpc.issue.workers_{workers}"]["workers"] = workers
