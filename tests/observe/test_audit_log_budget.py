"""The log budget of the events a caller can cause at will: counted per event *and peer*
(one peer's garbage does not silence another's failures), bounded in the peers it tracks,
summed up per event; security events are never cut.

An AuditTrail whose Redis is a closed loopback port: only its log lines are looked at."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from tokensvc.observe import audit
from tokensvc.observe.audit import LOG_BURST, WARN_INTERVAL, AuditTrail


@pytest.fixture
def trail(caplog) -> AuditTrail:
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    return AuditTrail(aioredis.Redis.from_url("redis://127.0.0.1:1/0"))


def _lines(caplog, peer: str | None = None) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "tokensvc.audit"
        and getattr(r, "event", "") == "auth_failed"
        and (peer is None or getattr(r, "peer", "") == peer)
    ]


def _next_interval(trail: AuditTrail) -> None:
    trail._log_interval_start -= WARN_INTERVAL  # as if the interval had passed


def test_one_peers_noise_does_not_silence_another(trail, caplog):
    for _ in range(LOG_BURST + 5):
        trail.record("auth_failed", peer="spiffe://t/noisy", code="malformed")
    trail.record("auth_failed", peer="spiffe://t/quiet", code="unknown")
    trail.record("denied", peer="spiffe://t/noisy", code="policy")  # its own budget
    assert len(_lines(caplog, "spiffe://t/noisy")) == LOG_BURST
    assert len(_lines(caplog, "spiffe://t/quiet")) == 1
    assert [getattr(r, "event", "") for r in caplog.records].count("denied") == 1
    # the next interval starts with one line per event summing up what was cut
    _next_interval(trail)
    trail.record("auth_failed", peer="spiffe://t/noisy", code="malformed")
    (summary,) = [r for r in caplog.records if hasattr(r, "unlogged")]
    assert summary.levelno == logging.WARNING
    assert (summary.unlogged, summary.x_event, summary.peers) == (5, "auth_failed", 1)
    assert summary.noisiest_peer == "spiffe://t/noisy"
    assert len(_lines(caplog, "spiffe://t/noisy")) == LOG_BURST + 1  # a fresh budget


def test_peers_beyond_the_tracked_ones_share_one_budget(trail, caplog, monkeypatch):
    monkeypatch.setattr(audit, "LOG_PEERS_MAX", 3)
    peers = [f"10.0.0.{n}" for n in range(6)]
    for peer in peers:
        for _ in range(LOG_BURST + 1):
            trail.record("auth_failed", peer=peer, code="malformed")
    # three peers with their own budgets, the three others with one between them
    assert len(_lines(caplog)) == 4 * LOG_BURST
    assert all(len(_lines(caplog, p)) == LOG_BURST for p in peers[:3])
    assert len(_lines(caplog, peers[3])) == LOG_BURST
    assert not _lines(caplog, peers[4]) and not _lines(caplog, peers[5])
    _next_interval(trail)
    trail.record("auth_failed", peer=peers[5], code="malformed")
    (summary,) = [r for r in caplog.records if hasattr(r, "unlogged")]
    assert (summary.unlogged, summary.peers) == (6 * (LOG_BURST + 1) - 4 * LOG_BURST, 4)
    assert summary.noisiest_peer == "(other peers)"
    assert len(_lines(caplog, peers[5])) == 1  # the table starts afresh


def test_security_events_are_never_cut(trail, caplog):
    for _ in range(LOG_BURST + 5):
        trail.record("bound_token_misuse", peer="spiffe://t/thief", code="certificate_mismatch")
    thefts = [r for r in caplog.records if getattr(r, "event", "") == "bound_token_misuse"]
    assert len(thefts) == LOG_BURST + 5
    assert all(r.levelno == logging.WARNING for r in thefts)
    assert "bound_token_misuse" in audit.SECURITY_EVENTS  # in ts:audit:security too
