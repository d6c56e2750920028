"""The revocation feed end to end: a real tokensvc, real Redis, a protected sample service
whose interceptor checks every call against a RevocationFeed (blocking server) or an
AioRevocationFeed (asyncio server).

* propagation: a revoked access token -- by token, session or subject ("log out
  everywhere"), or by its signing key -- is refused by the interceptor within a second of
  Revoke returning (the figures are printed: run with ``-s``);
* resume: the token service, and then Redis too, restart between revocations; the feed
  resumes from its last event id and misses nothing;
* staleness: with the feed down longer than ``max_staleness``, calls go on against the
  last known set (counted, logged) or, failing closed, are refused UNAVAILABLE.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client.conftest import Protected, refusal
from tests.support import ServerThread, wait_until
from tests.support.feed import PROPAGATION_BOUND, Feed
from tokensvc.config import Settings
from tokensvc.redis.embedded import RedisProcess, free_port
from tokensvc_client import (
    TokenClient,
)
from tokensvc_client.v1 import tokensvc_pb2 as pb

REVOKED = "invalid token: revoked"


def is_revoked_refusal(err: grpc.RpcError | None) -> bool:
    return (
        err is not None
        and err.code() == grpc.StatusCode.UNAUTHENTICATED
        and err.details() == REVOKED
    )


def until_refused(protected: Protected, token: str, timeout: float = PROPAGATION_BOUND) -> float:
    """Call until the token is refused as revoked; seconds it took (for the report only:
    no test asserts a time; fails after ``timeout`` scaled)."""
    start = time.monotonic()

    def refused() -> bool:
        err = refusal(protected, token)
        assert err is None or is_revoked_refusal(err), (err.code(), err.details())
        return err is not None

    wait_until(refused, timeout, what="the revocation to reach the interceptor", interval=0.005)
    return time.monotonic() - start


def accepted(protected: Protected, token: str) -> bool:
    err = refusal(protected, token)
    assert err is None or is_revoked_refusal(err), (err.code(), err.details())
    return err is None


def propagation(protected: Protected, token: str, revoke: Callable[[], object]) -> float:
    """Seconds from ``revoke()`` returning to the first call refused as revoked, while
    another thread calls the protected service with ``token`` in a loop."""
    refused_at: list[float] = []
    errors: list[Any] = []
    started = threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            err = refusal(protected, token)
            started.set()
            if is_revoked_refusal(err):
                refused_at.append(time.monotonic())
                return
            if err is not None:
                errors.append((err.code(), err.details()))
                return

    thread = threading.Thread(target=hammer)
    thread.start()
    assert started.wait(10)
    time.sleep(0.05)  # calls keep succeeding until the revocation
    assert not refused_at, "refused before the revocation"
    revoke()
    revoked_at = time.monotonic()
    thread.join(15)
    assert not errors, errors
    assert refused_at, "revocation never reached the interceptor"
    return refused_at[0] - revoked_at


# -- propagation -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_revoked_token_is_refused_within_a_second(
    kind: str,
    tokensvc: ServerThread,
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
    client: TokenClient,
) -> None:
    feed = make_feed(tokensvc.target, kind)
    assert feed.wait_connected()
    protected = make_protected(tokensvc, kind, revocation_check=feed.feed)
    figures = []
    for _ in range(5):
        pair = client.issue("alice")
        assert accepted(protected, pair.access_token)
        token = pair.access_token
        figures.append(propagation(protected, token, lambda t=token: client.revoke(token=t)))
    print(
        f"\n[{kind}] Revoke -> first refused call: "
        f"median {statistics.median(figures) * 1000:.1f} ms, "
        f"max {max(figures) * 1000:.1f} ms over {len(figures)} revocations"
    )
    assert feed.feed.events >= 6  # RESET and the five revocations
    assert feed.feed.connected and feed.feed.healthy


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_session_and_subject_revocations_reach_the_interceptor(
    kind: str,
    tokensvc: ServerThread,
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
    client: TokenClient,
) -> None:
    feed = make_feed(tokensvc.target, kind)
    assert feed.wait_connected()
    protected = make_protected(tokensvc, kind, revocation_check=feed.feed)

    # a session: every access token of it, the refreshed one included
    first = client.issue("carol", session_label="laptop")
    second = client.refresh(first.refresh_token)
    other = client.issue("carol", session_label="phone")
    for pair in (first, second, other):
        assert accepted(protected, pair.access_token)
    took = propagation(
        protected, second.access_token, lambda: client.revoke(session_id=first.session_id)
    )
    assert not accepted(protected, first.access_token)  # the same session event
    assert accepted(protected, other.access_token)  # another session of the subject

    # the subject: log out everywhere
    laptop, phone = client.issue("dave"), client.issue("dave")
    bystander = client.issue("erin")
    took_subject = propagation(
        protected, laptop.access_token, lambda: client.revoke(subject="dave")
    )
    # the other session's event is of the same revocation (one script, one batch)
    until_refused(protected, phone.access_token)
    assert accepted(protected, bystander.access_token)
    print(
        f"\n[{kind}] session revoke -> refused in {took * 1000:.1f} ms; "
        f"subject revoke -> {took_subject * 1000:.1f} ms"
    )
    # logging in again afterwards works: tokens issued after the watermark's second
    # (iat has whole seconds; the interceptor refuses every iat before revoked_before)
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    again = client.issue("dave")
    assert accepted(protected, again.access_token)


def test_an_emergency_key_rotation_reaches_the_interceptor(
    tokensvc: ServerThread,
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
    client: TokenClient,
) -> None:
    feed = make_feed(tokensvc.target, "sync")
    assert feed.wait_connected()
    # the sample service caches the key set: without the feed, tokens of the removed key
    # would verify until its next fetch
    protected = make_protected(tokensvc, "sync", revocation_check=feed.feed)
    pair = client.issue("frank")
    assert accepted(protected, pair.access_token)
    stub = tokensvc.stub()
    took = propagation(
        protected,
        pair.access_token,
        lambda: stub.RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True)),
    )
    print(f"\n[sync] emergency key rotation -> refused in {took * 1000:.1f} ms")


# -- resume ------------------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test alone (append-only file in tmp_path), to restart; on a unix
    socket, so no other process can take its address while it is down."""
    proc = RedisProcess(tmp_path / "own-redis", unix_socket=True).start()
    yield proc
    proc.stop()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_nothing_is_missed_across_token_service_and_redis_restarts(
    kind: str,
    own_redis: RedisProcess,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
) -> None:
    # the feed and the sample service's key fetches talk to "watched", which comes back
    # on the same port; revocations made while it is down go through "other"
    settings = make_settings(redis_url=own_redis.url, listen=f"127.0.0.1:{free_port()}")
    watched = start_server(settings)
    other = start_server(make_settings(redis_url=own_redis.url))
    feed = make_feed(watched.target, kind)
    assert feed.wait_connected()
    protected = make_protected(watched, kind, revocation_check=feed.feed)
    with TokenClient(other.target, insecure=True) as client:
        pairs = [client.issue(f"user{i}") for i in range(5)]
        for pair in pairs:
            assert accepted(protected, pair.access_token)

        # 1. live
        client.revoke(token=pairs[0].access_token)
        until_refused(protected, pairs[0].access_token)
        resets, streams = feed.feed.stats().resets, feed.feed.reconnects

        # 2. revoked while the watched token service is down
        watched.stop()
        client.revoke(token=pairs[1].access_token)
        client.revoke(session_id=pairs[2].session_id)
        assert accepted(protected, pairs[1].access_token)  # the feed cannot know yet
        watched = start_server(settings)
        until_refused(protected, pairs[1].access_token, timeout=15)
        until_refused(protected, pairs[2].access_token)
        assert feed.feed.reconnects > streams
        assert feed.feed.stats().resets == resets  # resumed, not started over

        # 3. Redis and the watched service restart; a revocation in between
        watched.stop()
        own_redis.stop()
        own_redis.start()  # same port and data directory: the append-only file is replayed
        deadline = time.monotonic() + 15
        while True:  # "other" reconnects to Redis by itself
            try:
                client.revoke(token=pairs[3].access_token)
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        watched = start_server(settings)
        until_refused(protected, pairs[3].access_token, timeout=15)
        assert feed.feed.stats().resets == resets  # the stream survived Redis: resumed

    # nothing missed, nothing more: the earlier revocations hold, the last token is fine
    for pair in pairs[:4]:
        assert not accepted(protected, pair.access_token)
    assert accepted(protected, pairs[4].access_token)
    assert feed.wait_connected()
    print(
        f"\n[{kind}] {feed.feed.reconnects} reconnects, {feed.feed.stats().resets} RESET, "
        f"resumed from {feed.feed.last_event_id!r}"
    )


# -- staleness ---------------------------------------------------------------------------


def test_a_stale_feed_failing_closed_refuses_calls_until_it_is_back(
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
) -> None:
    settings = make_settings(listen=f"127.0.0.1:{free_port()}")
    service = start_server(settings)
    feed = make_feed(service.target, "sync", max_staleness=0.5, fail_closed=True)
    assert feed.wait_connected()
    protected = make_protected(service, "sync", revocation_check=feed.feed)
    with TokenClient(service.target, insecure=True) as client:
        pair = client.issue("grace")
    assert accepted(protected, pair.access_token)

    service.stop()
    deadline = time.monotonic() + 10
    while feed.feed.healthy:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    err = refusal(protected, pair.access_token)
    assert err is not None
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "authorization check failed"
    assert feed.feed.stale_checks >= 1

    service = start_server(settings)  # back: the feed reconnects, calls pass again
    assert feed.wait_connected(15)
    assert accepted(protected, pair.access_token)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_stale_feed_keeps_the_last_known_set_by_default(
    kind: str,
    make_settings: Callable[..., Settings],
    start_server: Callable[..., ServerThread],
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(listen=f"127.0.0.1:{free_port()}")
    service = start_server(settings)
    feed = make_feed(service.target, kind, max_staleness=0.5)
    assert feed.wait_connected()
    protected = make_protected(service, kind, revocation_check=feed.feed)
    with TokenClient(service.target, insecure=True) as client:
        good, bad = client.issue("heidi"), client.issue("ivan")
        client.revoke(token=bad.access_token)
    until_refused(protected, bad.access_token)

    caplog.set_level(logging.WARNING, logger="tokensvc_client.revocations")
    service.stop()
    deadline = time.monotonic() + 10
    while feed.feed.healthy:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(3):
        assert accepted(protected, good.access_token)  # keeps serving
        assert not accepted(protected, bad.access_token)  # what it knew still holds
    stats = feed.feed.stats()
    assert stats.stale_checks >= 3 and not stats.healthy and not stats.connected
    warnings = [r for r in caplog.records if "revocation feed down" in r.getMessage()]
    assert len(warnings) == 1  # at most one a minute, however many calls
    assert "last known revocations" in warnings[0].getMessage()

    service = start_server(settings)
    assert feed.wait_connected(15)
    assert feed.feed.healthy
