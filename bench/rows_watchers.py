"""Rows feed.*: Introspect while 60 interceptors hold idle WatchRevocations streams over
30 000 revocations in force, against Introspect on the same server before they connected.
Each new stream's catch-up comes from the process's memory (tokensvc.api.revocation_hub), so connected
watchers cost other callers next to nothing."""

from __future__ import annotations

import secrets
import sys
import time

import redis

from bench.run import Bench, Target, process
from tokensvc.store import REVOCATIONS
from tokensvc_client.v1 import tokensvc_pb2 as pb

ROWS = ("feed.introspect_alone", "feed.introspect_60_watchers")
TARGETS = [
    Target("feed.introspect_60_watchers", "feed.introspect_alone", at_least=0.9),
    # steadier than RPS on a shared machine: the server's CPU per Introspect
    Target("feed.introspect_60_watchers", "feed.introspect_alone", "server_cpu_us", at_most=1.1),
]
WATCHERS = 60


def _revoke(url: str, count: int) -> None:
    """``count`` token revocations in force, written as the revoking scripts write them."""
    client = redis.Redis.from_url(url)
    client.delete(REVOCATIONS)
    exp = str(int(time.time() * 1000) + 3_600_000)
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(REVOCATIONS, {"kind": "token", "value": secrets.token_urlsafe(16), "exp": exp})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    client.close()


def run(b: Bench) -> None:
    revocations = b.n(30_000)
    _revoke(b.redis_url, revocations)
    n = b.n(4000)
    with b.serve(
        "--max-watchers-per-client", str(WATCHERS), "--rate-full-catch-ups", "off"
    ) as server:
        reply = b.load(
            server.target,
            "/tokensvc.v1.TokenService/Issue",
            [pb.IssueRequest(subject="bench-user").SerializeToString()],
            procs=1,
            keep_replies=True,
        )
        access = pb.IssueResponse.FromString(reply.replies[0]).tokens.access_token
        req = [pb.IntrospectRequest(token=access).SerializeToString()] * n
        b.measure("feed.introspect_alone", server, "Introspect", req)
        args = [sys.executable, "-m", "bench.watchers", server.target, str(WATCHERS)]
        started = time.monotonic()
        with process([*args, str(revocations + 1)], "ready"):  # RESET + each revocation
            catch_up = time.monotonic() - started  # all 60 snapshots delivered
            b.measure("feed.introspect_60_watchers", server, "Introspect", req)
        for name in ROWS:
            b.rows[name].update(watchers=WATCHERS if "60" in name else 0, revocations=revocations)
        b.rows["feed.introspect_60_watchers"]["catch_up_s"] = round(catch_up, 2)
