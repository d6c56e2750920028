"""--redis-url topologies: URL parsing, Redis Cluster, Sentinel failover, no client retries.

Real redis-server processes on loopback (tests.support.topology), real tokensvc servers over gRPC.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
import redis

from tests.support import ServerThread, scaled, until_available, wait_until
from tests.support.rpc import code_of
from tests.support.topology import (
    NOT_YET,
    Cluster,
    client,
    frozen,
    healthy_replicas,
    paused_scripts,
    redis_cluster,
    redis_sentinel,
)
from tokensvc.config import ConfigError, Rate, Settings
from tokensvc.families.tokens import tag_of
from tokensvc.redis.connection import (
    ClusterTarget,
    SentinelPrimary,
    SentinelTarget,
    parse_cluster_url,
    parse_sentinel_url,
    redis_client,
)
from tokensvc.redis.embedded import RedisProcess
from tokensvc.store import REVOCATIONS, family_key, subject_key
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc

Stub: TypeAlias = tokensvc_pb2_grpc.TokenServiceStub


# --- URL parsing ---------------------------------------------------------------------------


def test_sentinel_url_with_several_sentinels_credentials_and_options():
    target = parse_sentinel_url(
        "redis+sentinel://app:p%40ss%2Fw@10.0.0.1:26380,sentinel-b,[::1]:26381/main-1"
        "?db=3&sentinel_password=s%26cret"
    )
    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)),
        master="main-1",
        db=3,
        username="app",
        password="p@ss/w",
        sentinel_password="s&cret",
    )
    assert parse_sentinel_url("redis+sentinel://:pw@h:1/m").password == "pw"
    assert parse_sentinel_url("redis+sentinel://:pw@h:1/m").username is None


def test_cluster_url():
    assert parse_cluster_url("redis+cluster://a:7000,b:7001,[fe80::1]") == ClusterTarget(
        (("a", 7000), ("b", 7001), ("fe80::1", 6379))
    )
    assert parse_cluster_url("redis+cluster://u:pw@a:7000/") == ClusterTarget(
        (("a", 7000),), "u", "pw"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379", "master name is required"),
        ("redis+sentinel://h:26379/", "master name is required"),
        ("redis+sentinel:///m", "at least one HOST:PORT"),
        ("redis+sentinel://h:0/m", "port out of range"),
        ("redis+sentinel://h:70000/m", "port out of range"),
        ("redis+sentinel://h:port/m", "bad port"),
        ("redis+sentinel://h:1,,h:2/m", "bad host"),
        ("redis+sentinel://h o:1/m", "bad host"),
        ("redis+sentinel://h:1,h:1/m", "listed twice"),
        ("redis+sentinel://h:1/m/x", "bad master name"),
        ("redis+sentinel://h:1/m?db=x", "db must be a database number"),
        ("redis+sentinel://h:1/m?db=1&db=2", "given twice"),
        ("redis+sentinel://h:1/m?timeout=3", "unknown query parameter 'timeout'"),
        ("redis+sentinel://h:1/m#frag", "fragment"),
        ("redis+sentinel://@h:1/m", "empty credentials"),
        ("redis+cluster://", "at least one HOST:PORT"),
        ("redis+cluster://a:1/2", "only database 0"),
        ("redis+cluster://a:1?ssl=true", "unknown query parameter 'ssl'"),
        ("redis+cluster://[::1:7000", "bad host"),
        ("redis+clustr://a:1", "must start with one of"),
    ],
)
def test_malformed_urls_are_config_errors(url: str, message: str):
    with pytest.raises(ConfigError, match=message) as err:
        redis_client(url, 1.0)
    assert str(err.value).startswith("--redis-url")


def test_config_errors_never_repeat_the_password():
    with pytest.raises(ConfigError) as err:
        parse_sentinel_url("redis+sentinel://user:hunter2@h:1/bad name")
    assert "hunter2" not in str(err.value)
    assert "user:***@h:1" in str(err.value)


def test_no_client_retries_a_command_on_its_own():
    """Every level that could re-send a command is configured with zero retries (the
    behaviour is tested below, with a dropped connection)."""
    clients = [
        redis_client("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", 1.0),
        redis_client("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/m", 1.0),
        redis_client("redis://127.0.0.1:6379/0", 1.0),
        redis_client("unix:///tmp/redis.sock", 1.0),
    ]
    cluster, sentinel, *single = clients
    try:
        assert isinstance(cluster, redis.asyncio.RedisCluster)
        assert cluster.retry.get_retries() == 0
        assert isinstance(sentinel, SentinelPrimary)
        for each in (sentinel, *single):
            assert isinstance(each, redis.asyncio.Redis)
            retry = each.get_retry()
            assert retry is not None and retry.get_retries() == 0
            assert not each.connection_pool.connection_kwargs.get("retry_on_timeout")
    finally:
        for each in clients:
            asyncio.run(each.aclose())


# --- helpers ------------------------------------------------------------------------------


def _issue(stub: Stub, subject: str) -> pb.TokenPair:
    return stub.Issue(pb.IssueRequest(subject=subject), timeout=10).tokens


def _refresh(stub: Stub, token: str) -> pb.TokenPair:
    return stub.Refresh(pb.RefreshRequest(refresh_token=token), timeout=10).tokens


def _active(stub: Stub, token: str) -> bool:
    return bool(stub.Introspect(pb.IntrospectRequest(token=token), timeout=10).active)


# --- Redis Cluster ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three masters; the first has a replica (for WAIT), the others none."""
    with redis_cluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1) as started:
        yield started


@pytest.fixture
def cluster_url(cluster: Cluster) -> str:
    cluster.flush()
    return cluster.url


def test_cluster_full_flow(
    cluster: Cluster,
    cluster_url: str,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    stub = start_server(make_settings(redis_url=cluster_url)).stub()

    # families of different subjects land on different masters
    pairs = {f"user-{i}": _issue(stub, f"user-{i}") for i in range(8)}
    homes = {}
    for subject, pair in pairs.items():
        key = family_key(pair.session_id)
        home = cluster.master_of(key)
        with client(home) as conn:
            assert conn.exists(key) == 1, subject  # physically on the slot's master
        homes[subject] = home.port
    assert len(set(homes.values())) >= 2

    # rotation, then reuse of the rotated token revokes the family
    first = pairs["user-0"]
    second = _refresh(stub, first.refresh_token)
    assert _active(stub, second.access_token)
    assert code_of(lambda: _refresh(stub, first.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED
    assert not _active(stub, second.access_token)
    assert code_of(lambda: _refresh(stub, second.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED

    # revocation by subject (watermark + index in the subject's slot), session and jti
    extra = _issue(stub, "user-1")
    assert stub.Revoke(pb.RevokeRequest(subject="user-1")).revoked_sessions == 2
    for pair in (pairs["user-1"], extra):
        assert not _active(stub, pair.access_token)
        assert code_of(lambda p=pair: _refresh(stub, p.refresh_token)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    assert _active(stub, pairs["user-2"].access_token)  # other subjects untouched
    sid = pairs["user-2"].session_id
    assert stub.Revoke(pb.RevokeRequest(session_id=sid)).revoked_sessions == 1
    assert not _active(stub, pairs["user-2"].refresh_token)
    assert stub.Revoke(pb.RevokeRequest(token=pairs["user-3"].access_token)).revoked_sessions == 0
    assert not _active(stub, pairs["user-3"].access_token)
    assert _active(stub, _refresh(stub, pairs["user-3"].refresh_token).access_token)

    # the key ring lives in its own slot; GetKeys serves it
    assert stub.GetKeys(pb.GetKeysRequest()).jwks
    with client(cluster.master_of("ts:{keyring}:keys")) as conn:
        assert conn.exists("ts:{keyring}:keys") == 1

    # the audit trail (written in the background) reaches the stream
    wanted = {"issued", "refreshed", "reuse_detected", "revoked"}
    with cluster.client() as conn:

        def events() -> bool:
            seen = {fields.get(b"event", b"").decode() for _, fields in conn.xrange("ts:audit")}
            return wanted <= seen

        wait_until(
            events, timeout=10, what="audit events in ts:audit", interval=0.05, ignore=NOT_YET
        )


def test_cluster_revocation_feed_and_a_retry_after_a_lost_event(
    cluster: Cluster,
    cluster_url: str,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    """On Cluster the feed's events are appended after the revoking script (the stream is
    in another slot). If that append is lost, the caller's retry announces it again."""
    stub = start_server(make_settings(redis_url=cluster_url)).stub()
    pair = _issue(stub, "feed-user")
    reused = _issue(stub, "feed-other")
    rotated = _refresh(stub, reused.refresh_token)

    def events() -> list[tuple[bytes, bytes]]:
        with cluster.client() as conn:
            return [(f[b"kind"], f[b"value"]) for _, f in conn.xrange(REVOCATIONS)]

    assert stub.Revoke(pb.RevokeRequest(session_id=pair.session_id)).revoked_sessions == 1
    assert events() == [(b"session", pair.session_id.encode())]
    assert code_of(lambda: _refresh(stub, reused.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED
    assert events()[-1] == (b"session", rotated.session_id.encode())

    with cluster.client() as conn:
        conn.delete(REVOCATIONS)  # as if the appends after the scripts had been lost
    # the callers retry (their first attempt answered UNAVAILABLE)
    assert stub.Revoke(pb.RevokeRequest(session_id=pair.session_id)).revoked_sessions == 0
    assert code_of(lambda: _refresh(stub, reused.refresh_token)) == grpc.StatusCode.UNAUTHENTICATED
    assert sorted(events()) == sorted(
        [(b"session", pair.session_id.encode()), (b"session", rotated.session_id.encode())]
    )


def _subject_on(
    stub: Stub, cluster: Cluster, master: RedisProcess, other: bool = False
) -> tuple[str, pb.TokenPair]:
    """A subject whose keys live on ``master`` (or, with ``other``, on another master), and
    the session issued to find out (tags are keyed: only the server can compute them)."""
    for i in range(1000):
        subject = f"{'other' if other else 'subject'}-{i}"
        pair = _issue(stub, subject)
        on_master = cluster.master_of(subject_key(tag_of(pair.session_id))) is master
        if on_master != other:
            return subject, pair
    raise AssertionError("no such subject")


def test_cluster_wait_goes_to_the_primary_of_the_revoked_slot(
    cluster: Cluster,
    cluster_url: str,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    """With --redis-wait-replicas 1 a revocation is acknowledged only if the primary
    holding it has a replica that confirmed it: the first master has one, the others
    none, so revocations there are UNAVAILABLE (though in force on their primary)."""
    wait = min(scaled(0.2), 1.5)  # a busy replica acknowledges late
    settings = make_settings(redis_url=cluster_url, redis_wait_replicas=1, redis_wait_timeout=wait)
    stub = start_server(settings).stub()
    # Issue waits for the replicas too: issue through a server without WAIT
    issuer = start_server(make_settings(redis_url=cluster_url)).stub()
    subject, replicated = _subject_on(issuer, cluster, cluster.masters[0])
    sibling = _issue(issuer, subject)
    _, lonely = _subject_on(issuer, cluster, cluster.masters[0], other=True)

    # every kind of revocation (session, jti, subject) waits on the first master
    assert stub.Revoke(pb.RevokeRequest(session_id=replicated.session_id)).revoked_sessions == 1
    with client(cluster.replicas[0], single_connection_client=True) as replica:
        replica.execute_command("READONLY")  # read the replica's own copy, no MOVED
        state = replica.hget(family_key(replicated.session_id), "state")
    assert state == b"revoked"  # the replica had it when Revoke returned
    assert stub.Revoke(pb.RevokeRequest(token=sibling.access_token)).revoked_sessions == 0
    assert stub.Revoke(pb.RevokeRequest(subject=subject)).revoked_sessions == 1
    assert not _active(stub, sibling.refresh_token)

    for request in (
        pb.RevokeRequest(session_id=lonely.session_id),
        pb.RevokeRequest(token=lonely.access_token),
    ):
        assert code_of(lambda r=request: stub.Revoke(r)) == grpc.StatusCode.UNAVAILABLE
    assert not _active(stub, lonely.access_token)  # written on the primary all the same


# --- Sentinel -----------------------------------------------------------------------------


@dataclass
class Revocation:
    kind: str
    pair: pb.TokenPair
    after_kill: bool


@dataclass
class Traffic:
    """Issue, refresh and revoke in a loop on its own thread; records every revocation
    that was acknowledged (Revoke returned OK)."""

    stub: Stub
    acknowledged: list[Revocation] = field(default_factory=list)
    failed_calls: int = 0
    killed: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    KINDS = ("session", "refresh_token", "access_token", "subject")

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                self.step(i)
        except BaseException as err:  # surfaced by the test
            self.error = err

    def step(self, i: int) -> None:
        kind = self.KINDS[i % len(self.KINDS)]
        subject = f"traffic-{i}"
        killed = self.killed
        try:
            pair = _refresh(self.stub, _issue(self.stub, subject).refresh_token)
            request = {
                "session": pb.RevokeRequest(session_id=pair.session_id),
                "refresh_token": pb.RevokeRequest(token=pair.refresh_token),
                "access_token": pb.RevokeRequest(token=pair.access_token),
                "subject": pb.RevokeRequest(subject=subject),
            }[kind]
            self.stub.Revoke(request, timeout=10)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            self.failed_calls += 1
            time.sleep(0.02)  # pacing while Redis fails over, not a wait for a condition
            return
        self.acknowledged.append(Revocation(kind, pair, killed))

    def count(self, after_kill: bool) -> int:
        return sum(1 for r in self.acknowledged if r.after_kill == after_kill)


def test_sentinel_failover_keeps_every_acknowledged_revocation(
    tmp_path: Path,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    with redis_sentinel(tmp_path / "sentinel") as group:
        settings = make_settings(
            redis_url=group.url,
            redis_wait_replicas=1,
            redis_wait_timeout=min(scaled(0.3), 1.5),  # a busy replica acknowledges late
            rate_auth_failures=Rate(0, 1),  # the checks below present revoked tokens
        )
        stub = start_server(settings).stub()

        # WAIT is real: with the replica frozen a revocation is not acknowledged (Issue
        # waits for the replica too: on a busy machine its first WAIT may time out)
        pair = until_available(lambda: _issue(stub, "frozen-replica"))
        with frozen(group.replica):
            code = code_of(lambda: stub.Revoke(pb.RevokeRequest(session_id=pair.session_id)))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert not _active(stub, pair.access_token)  # in force on the primary
        wait_until(
            lambda: healthy_replicas(group) >= 1,
            what="the sentinel to see the replica again",
            interval=0.05,
            ignore=NOT_YET,
        )

        traffic = Traffic(stub)
        thread = threading.Thread(target=traffic.run, daemon=True)
        thread.start()
        try:
            wait_until(
                lambda: traffic.count(False) >= 12,
                what="revocations before the kill",
                interval=0.05,
                ignore=NOT_YET,
            )
            old = group.primary
            traffic.killed = True
            old.kill()  # SIGKILL mid-traffic
            new = group.wait_failover(old)
            # without a replica, WAIT cannot be satisfied: bring the old node back as one
            group.restart_as_replica(old, new)
            wait_until(
                lambda: traffic.count(True) >= 8,
                what="revocations after the failover",
                interval=0.05,
                ignore=NOT_YET,
            )
        finally:
            traffic.stop.set()
            thread.join(15)
        assert traffic.error is None, traffic.error
        assert traffic.failed_calls > 0  # the failover was noticed

        # every acknowledged revocation is in force on the new primary
        assert _active(stub, until_available(lambda: _issue(stub, "after-failover")).access_token)
        for revocation in traffic.acknowledged:
            pair = revocation.pair
            assert not until_available(lambda p=pair: _active(stub, p.access_token)), revocation
            if revocation.kind != "access_token":
                code = code_of(
                    lambda p=pair: until_available(lambda: _refresh(stub, p.refresh_token))
                )
                assert code == grpc.StatusCode.UNAUTHENTICATED, revocation


# --- a lost reply is not re-sent ----------------------------------------------------------


def _refresh_with_a_dropped_connection(stub: Stub, node: RedisProcess, token: str) -> Future[Any]:
    """Refresh while the node holding the family is paused for writes; drop the
    service's connection while its script waits, so the command never runs and the
    reply never comes; give a client that re-sends the command the chance to."""
    with client(node, decode_responses=True) as admin, ThreadPoolExecutor(1) as pool:
        admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
        try:
            call = pool.submit(stub.Refresh, pb.RefreshRequest(refresh_token=token), timeout=10)
            wait_until(
                lambda: paused_scripts(admin),
                what="a script to wait in Redis",
                interval=0.05,
                ignore=NOT_YET,
            )
            # the Refresh was sent first, but an audit flush or key ring tick may wait there
            # before it: give it time to arrive, so the set below surely holds it. A fixed
            # sleep, as nothing Redis shows (CLIENT LIST has no arguments) tells the
            # Refresh's script from a background one; scaled for a busy machine.
            time.sleep(scaled(0.5))
            waiting = paused_scripts(admin)
            for client_id in waiting:  # also a key ring tick waiting there, if any
                admin.execute_command("CLIENT", "KILL", "ID", client_id)
            # a retrying client sends the script again: it would wait here too
            wait_until(
                lambda: call.done() or (paused_scripts(admin) - waiting),
                what="the Refresh to fail or be re-sent",
                interval=0.05,
                ignore=NOT_YET,
            )
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        call.exception(timeout=15)
        return call


@pytest.fixture(params=["cluster", "sentinel"])
def topology(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, Callable[[str], RedisProcess]]]:
    """(url, the primary holding a key) of the shared cluster or a fresh Sentinel group."""
    if request.param == "cluster":
        started: Cluster = request.getfixturevalue("cluster")
        started.flush()
        yield started.url, started.master_of
        return
    with redis_sentinel(tmp_path / "sentinel") as group:
        yield group.url, lambda _key: group.current_primary()


def test_a_refresh_whose_connection_dies_is_not_resent(
    topology: tuple[str, Callable[[str], RedisProcess]],
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    """Redis never ran the Refresh and its reply never came: the service reports
    UNAVAILABLE and does not re-send it (a re-sent Refresh that did run would have spent
    the caller's token); the caller's own retry then succeeds."""
    url, home_of = topology
    stub = start_server(make_settings(redis_url=url)).stub()
    pair = _issue(stub, "retry-probe")
    call = _refresh_with_a_dropped_connection(
        stub, home_of(family_key(pair.session_id)), pair.refresh_token
    )
    error = call.exception()
    assert isinstance(error, grpc.RpcError), "the Refresh was re-sent and ran"
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    retried = until_available(lambda: _refresh(stub, pair.refresh_token))
    assert _active(stub, retried.access_token)
