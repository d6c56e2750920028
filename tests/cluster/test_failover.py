"""Redis Cluster failover and resharding on a real 6-node cluster (3 masters, one replica
each, node timeout 2 s, loopback ports).

* A forced replication gap: the replica of the master holding the revocation stream (and
  the families used) is frozen and its link cut, the master takes a write that is therefore not
  acknowledged, is SIGKILLed, and its stale replica is promoted (CLUSTER FAILOVER
  TAKEOVER). Every revocation acknowledged under ``--redis-wait-replicas 1`` is still
  refused at Introspect and by a client feed (an interceptor's check), every acknowledged
  rotation is still the current one, and the feed's lost history is noticed (the hub
  resynchronises, the client gets a RESET).
* A slot holding live families migrates key by key under a small load: no call fails
  (refusals while the slot moves are retried within the call's deadline).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from redis.cluster import key_slot

from tests.support import ServerThread, scaled
from tests.support.topology import Cluster, client, frozen, redis_cluster, wait_for
from tokensvc.config import Rate, Settings
from tokensvc.families.tokens import tag_of
from tokensvc.store import REVOCATIONS, family_key, subject_key
from tokensvc.store.calls import SLOT_RETRIES
from tokensvc_client import channel
from tokensvc_client.revocation_feed import FEED_CHANNEL_OPTIONS, RevocationFeed
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1.tokensvc_pb2_grpc import TokenServiceStub
from tokensvc_client.verifier import Claims, claims_from_dict

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(
        tmp_path_factory.mktemp("cluster6"), masters=3, replicas=3, per_master=True
    ) as started:
        yield started


def _claims(access_token: str) -> Claims:
    payload = access_token.split(".")[1]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return claims_from_dict(json.loads(raw))


def _issue_on(
    stub: TokenServiceStub, cluster: Cluster, port: int, prefix: str
) -> tuple[str, pb.TokenPair]:
    """A subject whose keys live on the master at ``port``, and its first session."""
    for i in range(500):
        subject = f"{prefix}-{i}"
        pair = stub.Issue(pb.IssueRequest(subject=subject), timeout=10).tokens
        if cluster.master_of(subject_key(tag_of(pair.session_id))).port == port:
            return subject, pair
    raise AssertionError("no subject on that master")


def _until_ok(call: Callable[[], object]) -> object:
    """Retry UNAVAILABLE (a failover under way) until a bounded deadline."""
    result: list[object] = []

    def attempt() -> bool:
        try:
            result.append(call())
        except grpc.RpcError as err:
            if err.code() != UNAVAILABLE:
                raise
            return False
        return True

    wait_for("the call to succeed", attempt, timeout=20)
    return result[-1]


def _active(stub: TokenServiceStub, token: str) -> bool:
    request = pb.IntrospectRequest(token=token)
    return bool(_until_ok(lambda: stub.Introspect(request, timeout=10).active))


def test_acknowledged_writes_survive_a_failover_to_a_stale_replica(
    cluster: Cluster,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    cluster.flush()
    settings = make_settings(
        redis_url=cluster.url,
        redis_wait_replicas=1,
        redis_wait_timeout=min(scaled(0.3), 1.5),  # a busy replica acknowledges late
        refresh_grace_seconds=10,
        rate_auth_failures=Rate(0, 1),  # the checks present revoked tokens
        rate_issue=Rate(0, 1),
    )
    server = start_server(settings)
    stub = server.stub()
    home = cluster.master_of(REVOCATIONS)  # the stream's master: the one that fails
    feed_channel = channel(server.target, insecure=True, options=FEED_CHANNEL_OPTIONS)
    feed = RevocationFeed(feed_channel).start()
    try:
        assert feed.wait_connected(10)
        # acknowledged under WAIT: revocations of every kind, and rotations
        revoked: list[pb.TokenPair] = []
        for i in range(8):
            subject, pair = _issue_on(stub, cluster, home.port, f"revoked{i}")
            request = [
                pb.RevokeRequest(session_id=pair.session_id),
                pb.RevokeRequest(token=pair.access_token),
                pb.RevokeRequest(token=pair.refresh_token),
                pb.RevokeRequest(subject=subject),
            ][i % 4]
            stub.Revoke(request, timeout=10)
            revoked.append(pair)
        rotated = []
        for i in range(4):
            _, pair = _issue_on(stub, cluster, home.port, f"rotated{i}")
            request = pb.RefreshRequest(refresh_token=pair.refresh_token)
            rotated.append((pair, stub.Refresh(request, timeout=10).tokens))
        wait_for(
            "the feed to hold every revocation",
            lambda: all(feed(_claims(p.access_token)) for p in revoked),
        )
        _, gap = _issue_on(stub, cluster, home.port, "gap")

        # the gap: with the replica frozen a revocation is not acknowledged; the master
        # has it (and the feed announced it) when it is SIGKILLed
        with frozen(cluster.replica_for(home)):
            # cut the link too: what the master sends to a stopped replica would still
            # reach its socket buffer and be applied once it runs again
            with client(home) as conn:
                conn.execute_command("CLIENT KILL", "TYPE", "replica")
            with pytest.raises(grpc.RpcError) as err:
                stub.Revoke(pb.RevokeRequest(session_id=gap.session_id), timeout=10)
            assert err.value.code() == UNAVAILABLE
            wait_for("the unacknowledged event", lambda: feed(_claims(gap.access_token)))
            home.kill()
        resets = feed.stats().resets
        cluster.take_over(home)

        # the stream went back: the hub rebuilds, the feed starts over from a RESET
        wait_for("a RESET after the lost history", lambda: feed.stats().resets > resets, 30)
        for pair in revoked:
            assert not _active(stub, pair.access_token), pair.session_id
        wait_for("the feed to reconnect", lambda: feed.connected, timeout=20)
        for pair in revoked:
            assert feed(_claims(pair.access_token)), pair.session_id
        for old, new in rotated:
            assert _active(stub, new.refresh_token), new.session_id
            assert not _active(stub, old.refresh_token), old.session_id
    finally:
        feed.close()
        feed_channel.close()


@dataclass
class Load:
    """A small bounded load on one subject's sessions (one slot): refresh each chain,
    introspect, issue one more session per round. Every failure is recorded."""

    stub: TokenServiceStub
    subject: str
    tokens: list[str]
    rounds: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set() and self.rounds < 500:
            try:
                for i, token in enumerate(self.tokens):
                    new = self.stub.Refresh(pb.RefreshRequest(refresh_token=token), timeout=10)
                    self.tokens[i] = new.tokens.refresh_token
                    request = pb.IntrospectRequest(token=new.tokens.access_token)
                    assert self.stub.Introspect(request, timeout=10).active
                issue = pb.IssueRequest(subject=self.subject)
                assert self.stub.Issue(issue, timeout=10).tokens.session_id
            except grpc.RpcError as err:
                self.failures.append(f"{err.code()}: {err.details()}")
                return
            except AssertionError as err:
                self.failures.append(repr(err))
                return
            self.rounds += 1


def test_a_slot_migrating_under_load_fails_no_call(
    cluster: Cluster,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
):
    cluster.flush()
    settings = make_settings(redis_url=cluster.url, rate_issue=Rate(0, 1))
    stub = start_server(settings).stub()
    subject = "migrating"
    pairs = [stub.Issue(pb.IssueRequest(subject=subject), timeout=10).tokens for _ in range(4)]
    slot = key_slot(family_key(pairs[0].session_id).encode())
    source = cluster.master_of(family_key(pairs[0].session_id))
    target = next(m for m in cluster.masters if m is not source)
    with client(source) as conn:
        assert int(conn.execute_command("CLUSTER COUNTKEYSINSLOT", slot)) >= 5

    load = Load(stub, subject, [p.refresh_token for p in pairs])
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    try:
        wait_for("the load to run", lambda: load.rounds >= 2 or load.failures)
        retried = sum(SLOT_RETRIES.values())

        def between(moved: int) -> None:
            if moved == 1:  # keys now split between the nodes: calls meet TRYAGAIN
                wait_for(
                    "calls to meet the moving slot",
                    lambda: sum(SLOT_RETRIES.values()) >= retried + 3 or load.failures,
                )

        moved = cluster.migrate(slot, target, between)
        assert moved >= 5
        assert cluster.master_of(family_key(pairs[0].session_id)) is target
        done = load.rounds
        wait_for("the load to go on", lambda: load.rounds >= done + 3 or load.failures)
    finally:
        load.stop.set()
        thread.join(30)
    assert load.failures == []
    assert sum(SLOT_RETRIES.values()) > retried  # the migration was met, and retried
