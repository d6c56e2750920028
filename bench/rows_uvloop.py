"""Rows rpc.introspect|issue.uvloop_on / .uvloop_off: the same RPC under the standard load
against a tokensvc on uvloop (the default where it is installed) and on asyncio's own loop
(``--no-uvloop``), each between no-op runs like every measured row."""

from __future__ import annotations

from bench.run import Bench
from bench.service_rows import issue_request
from tokensvc_client import TokenClient
from tokensvc_client.v1 import tokensvc_pb2 as pb

ROWS = (
    "rpc.introspect.uvloop_on",
    "rpc.introspect.uvloop_off",
    "rpc.issue.uvloop_on",
    "rpc.issue.uvloop_off",
)


def run(b: Bench) -> None:
    n = b.n(4000)
    issue = issue_request()
    for suffix in ("uvloop_on", "uvloop_off"):
        extra = ("--no-uvloop",) if suffix == "uvloop_off" else ()
        with b.serve(*extra) as server:
            client = TokenClient(server.target, insecure=True)
            access = client.issue("bench-user").access_token
            client.close()
            req = pb.IntrospectRequest(token=access).SerializeToString()
            b.measure(f"rpc.introspect.{suffix}", server, "Introspect", [req] * n)
            b.measure(f"rpc.issue.{suffix}", server, "Issue", [issue] * n)
