"""The audit trail: log events, the capped stream, Redis outages, and `tokensvc audit tail`.

Real redis-server processes throughout; waits poll for a condition (bounded by the pytest
timeout), nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from tokensvc.cli import main as cli
from tokensvc.families.tokens import RefreshTokens, new_session_id
from tokensvc.observe import logs
from tokensvc.observe.audit import MAX_VALUE_CHARS, REDACTED, AuditTrail
from tokensvc.observe.audit_tail import tail
from tokensvc.observe.audit_writer import AUDIT_STREAM, BATCH_MAX
from tokensvc.redis.embedded import RedisProcess
from tokensvc.store import StoreUnavailable


def client(url: str) -> aioredis.Redis:
    """Like the server's client: short timeouts, no automatic retries, pooled connections
    checked before use (see tokensvc.redis.connection)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        decode_responses=True,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def until_len(r: aioredis.Redis, n: int, stream: str = AUDIT_STREAM) -> None:
    while await r.xlen(stream) < n:
        await asyncio.sleep(0.01)


def entries(url: str, stream: str = AUDIT_STREAM) -> list[dict[str, str]]:
    r = redis.Redis.from_url(url, decode_responses=True)
    try:
        return [fields for _id, fields in r.xrange(stream)]
    finally:
        r.close()


def write_records(url: str, *events: str) -> None:
    async def main() -> None:
        r = client(url)
        trail = AuditTrail(r)
        for i, event in enumerate(events):
            trail.record(event, subject="alice", session_id=f"s{i}", seq=i)
        await trail.flush()
        await r.aclose()

    asyncio.run(main())


# --- record and flush -------------------------------------------------------------------


def test_record_then_flush_writes_the_fields_without_empty_ones(redis_url):
    async def main() -> tuple[int, int]:
        r = client(redis_url)
        trail = AuditTrail(r)
        before = time.time_ns() // 1_000_000
        trail.record(
            "issued",
            peer="spiffe://tokensvc.test/ns/auth/sa/login",
            subject="alice",
            session_id="s1",
            jti="j1",
            client_id="web",
            scopes=3,
            label="",
        )
        trail.record("revoked", session_id="s1", reason="", subject="")
        assert trail.pending == 2
        assert await r.xlen(AUDIT_STREAM) == 0  # nothing written before a flush or run()
        await trail.flush()
        after = time.time_ns() // 1_000_000
        assert trail.pending == 0
        await r.aclose()
        return before, after

    before, after = asyncio.run(main())
    first, second = entries(redis_url)
    assert before <= int(first.pop("ts")) <= after
    assert first == {
        "event": "issued",
        "peer": "spiffe://tokensvc.test/ns/auth/sa/login",
        "subject": "alice",
        "session_id": "s1",
        "jti": "j1",
        "client_id": "web",
        "scopes": "3",
    }
    assert before <= int(second.pop("ts")) <= after
    assert second == {"event": "revoked", "session_id": "s1"}


def test_maxlen_caps_the_stream(redis_url):
    async def main() -> None:
        r = client(redis_url)
        trail = AuditTrail(r, maxlen=10)
        for i in range(1000):
            trail.record("refreshed", session_id="s", seq=i)
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    kept = entries(redis_url)
    # MAXLEN ~ trims whole stream nodes (100 entries by default): at least maxlen are kept,
    # never much more
    assert 10 <= len(kept) <= 10 + 100
    assert kept[-1]["seq"] == "999"
    assert [int(e["seq"]) for e in kept] == list(range(1000 - len(kept), 1000))


def test_other_stream_name(redis_url):
    async def main() -> None:
        r = client(redis_url)
        trail = AuditTrail(r, stream="other:audit")
        trail.record("locked", subject="mallory")
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    assert entries(redis_url) == []
    assert [e["event"] for e in entries(redis_url, "other:audit")] == ["locked"]


# --- the log event ----------------------------------------------------------------------


def test_log_event_carries_the_structured_fields(caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    # never contacted: record() only; log_routine: the issued event is logged too
    trail = AuditTrail(client("redis://127.0.0.1:1/0"), log_routine=True)
    trail.record("issued", subject="alice", session_id="s1", jti="j1", client_id="web")
    (rec,) = [r for r in caplog.records if r.name == "tokensvc.audit"]
    assert rec.levelno == logging.INFO
    assert (rec.event, rec.subject, rec.session_id, rec.jti, rec.client_id) == (
        "issued",
        "alice",
        "s1",
        "j1",
        "web",
    )
    assert not hasattr(rec, "peer") and not hasattr(rec, "reason")  # empty: left out
    assert not hasattr(rec, "trace_id")  # outside a span

    line = json.loads(logs.JsonFormatter().format(rec))
    assert line["level"] == "INFO"
    assert line["logger"] == "tokensvc.audit"
    assert line["msg"] == "audit issued"
    assert {k: line[k] for k in ("event", "subject", "session_id", "jti", "client_id")} == {
        "event": "issued",
        "subject": "alice",
        "session_id": "s1",
        "jti": "j1",
        "client_id": "web",
    }
    assert "peer" not in line and "reason" not in line and "trace_id" not in line


@pytest.mark.parametrize(
    ("event", "level"),
    [
        ("reuse_detected", logging.WARNING),
        ("denied", logging.WARNING),
        ("auth_failed", logging.WARNING),
        ("locked", logging.WARNING),
        ("issued", logging.INFO),
        ("refreshed", logging.INFO),
        ("revoked", logging.INFO),
        ("unlocked", logging.INFO),
        ("rate_limited", logging.INFO),
        ("something_new", logging.INFO),
    ],
)
def test_log_levels(caplog, event, level):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    AuditTrail(client("redis://127.0.0.1:1/0"), log_routine=True).record(event, subject="alice")
    (rec,) = [r for r in caplog.records if r.name == "tokensvc.audit"]
    assert rec.levelno == level
    assert rec.event == event


def test_routine_events_are_logged_only_when_asked_but_always_streamed(redis_url, caplog):
    """By default the log has the security-relevant events only; issued, refreshed,
    exchanged and txn_token_minted (one per Issue / Refresh / Exchange / Mint) still reach
    the stream, which is the audit trail; a refused exchange is logged."""
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    events = ["issued", "refreshed", "exchanged", "txn_token_minted", "reuse_detected"]
    events += ["denied", "auth_failed", "locked", "exchange_denied"]
    events += ["revoked", "rate_limited", "unlocked", "keys_rotated"]

    async def main() -> None:
        r = client(redis_url)
        trail = AuditTrail(r)
        for event in events:
            trail.record(event, subject="alice")
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    logged = [r.event for r in caplog.records if r.name == "tokensvc.audit"]
    assert logged == events[4:]
    assert [e["event"] for e in entries(redis_url)] == events


def test_trace_id_of_the_current_span_in_log_and_record(caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    trail = AuditTrail(client("redis://127.0.0.1:1/0"))
    tracer = TracerProvider().get_tracer(__name__)
    with tracer.start_as_current_span("rpc") as span:
        trail.record("denied", peer="spiffe://x/y", reason="policy")
        trace_id = format(span.get_span_context().trace_id, "032x")
    (rec,) = [r for r in caplog.records if r.name == "tokensvc.audit"]
    assert rec.trace_id == trace_id
    # formatted outside the span: the record's own trace id is kept
    assert json.loads(logs.JsonFormatter().format(rec))["trace_id"] == trace_id
    assert trail._queue[0]["trace_id"] == trace_id


def test_no_secrets_long_values_cut_reserved_names_renamed(redis_url, caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    refresh = RefreshTokens(bytes(32)).new(new_session_id("0" * 32), 1, 2_000_000_000)
    jws = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"

    async def main() -> None:
        r = client(redis_url)
        trail = AuditTrail(r)
        trail.record(
            "auth_failed",
            reason="x" * 1000,
            subject=refresh,
            detail=f"bearer {jws}",
            name="n",
            ts=5,
            id="i",
            msg="m",
        )
        await trail.flush()
        await r.aclose()

    asyncio.run(main())
    (entry,) = entries(redis_url)
    assert entry["reason"] == "x" * MAX_VALUE_CHARS
    assert entry["subject"] == REDACTED
    assert entry["detail"] == REDACTED
    assert (entry["x_name"], entry["x_ts"], entry["x_id"], entry["x_msg"]) == ("n", "5", "i", "m")
    assert int(entry["ts"]) > 1_600_000_000_000  # the real timestamp, not the caller's
    (rec,) = [r for r in caplog.records if r.name == "tokensvc.audit"]
    formatted = logs.JsonFormatter().format(rec)
    assert refresh not in formatted and jws not in formatted
    assert json.loads(formatted)["reason"] == "x" * MAX_VALUE_CHARS
    assert rec.name == "tokensvc.audit" and rec.x_name == "n"


# --- run(): batches, outages, the queue bound -------------------------------------------


def test_run_writes_in_the_background_in_order(redis_url):
    async def main() -> None:
        r = client(redis_url)
        trail = AuditTrail(r)
        task = asyncio.create_task(trail.run())
        trail.record("issued", session_id="first")
        await until_len(r, 1)
        n = BATCH_MAX * 2 + 10  # more than one batch at once
        for i in range(n):
            trail.record("refreshed", session_id="s", seq=i)
        await until_len(r, 1 + n)
        assert trail.write_failures == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await r.aclose()

    asyncio.run(main())
    got = entries(redis_url)
    assert got[0]["session_id"] == "first"
    assert [int(e["seq"]) for e in got[1:]] == list(range(BATCH_MAX * 2 + 10))


def test_cancelled_run_writes_what_is_queued(redis_url):
    async def main() -> None:
        r = client(redis_url)
        trail = AuditTrail(r)
        task = asyncio.create_task(trail.run())
        trail.record("issued", session_id="a")
        await until_len(r, 1)
        # just written: the next record waits for the batch interval, cancel meanwhile
        trail.record("revoked", session_id="a")
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trail.pending == 0
        await r.aclose()

    asyncio.run(main())
    assert [e["event"] for e in entries(redis_url)] == ["issued", "revoked"]


def test_cancelling_run_at_any_point_writes_each_record_exactly_once(redis_url):
    """Cancel run() a varying number of loop steps after a record: wherever the cancel
    lands (waiting, sending the pipeline, reading its reply) the task ends, and the record
    is written once -- not lost, not written twice by the final flush."""

    async def main() -> None:
        r = client(redis_url)
        for steps in range(12):
            trail = AuditTrail(r)
            task = asyncio.create_task(trail.run())
            await asyncio.sleep(0)  # running, waiting for records
            trail.record("issued", seq=steps)
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert trail.pending == 0
        await r.aclose()

    asyncio.run(main())
    assert [int(e["seq"]) for e in entries(redis_url)] == list(range(12))


def test_run_keeps_records_while_redis_is_down_and_writes_them_when_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    proc = RedisProcess(tmp_path / "redis", unix_socket=True, prefer_system=True).start()

    async def main() -> None:
        r = client(proc.url)
        trail = AuditTrail(r)
        task = asyncio.create_task(trail.run())
        trail.record("issued", session_id="before")
        await until_len(r, 1)

        await asyncio.to_thread(proc.stop)
        for i in range(5):
            trail.record("denied", reason=f"r{i}")  # returns at once, Redis or not
        await until(lambda: trail.write_failures >= 2)  # it failed and retried
        assert trail.pending == 5
        assert not task.done()

        await asyncio.to_thread(proc.start)  # same port and data directory
        await until_len(r, 6)
        assert trail.pending == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await r.aclose()

    try:
        asyncio.run(main())
        got = entries(proc.url)
    finally:
        proc.stop()
    assert [e.get("reason", e.get("session_id")) for e in got] == [
        "before",
        "r0",
        "r1",
        "r2",
        "r3",
        "r4",
    ]
    messages = [r.getMessage() for r in caplog.records if r.name == "tokensvc.audit"]
    assert any("cannot write to Redis" in m and "5 records queued" in m for m in messages)
    assert any("writing to Redis again" in m for m in messages)


def test_queue_bound_drops_the_oldest_and_reports_the_count(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tokensvc.audit")
    # not started yet
    proc = RedisProcess(tmp_path / "redis", unix_socket=True, prefer_system=True)

    async def main() -> AuditTrail:
        r = client(proc.url)
        trail = AuditTrail(r, queue_max=50)
        for i in range(60):
            trail.record("rate_limited", peer="spiffe://x/y", seq=i)
        assert (trail.pending, trail.dropped) == (50, 10)
        with pytest.raises(StoreUnavailable):
            await trail.flush()
        assert (trail.pending, trail.dropped) == (50, 10)  # a failed write keeps them

        await asyncio.to_thread(proc.start)
        await trail.flush()
        assert trail.pending == 0
        await r.aclose()
        return trail

    try:
        trail = asyncio.run(main())
        got = entries(proc.url)
    finally:
        proc.stop()
    assert [int(e["seq"]) for e in got] == list(range(10, 60))  # the 10 oldest went
    reports = [r for r in caplog.records if hasattr(r, "dropped")]
    # one warning at the first drop (then at most one per 10 s), the rest once written again
    assert [r.dropped for r in reports] == [1, 9]
    assert reports[-1].dropped_total == trail.dropped == 10
    assert all(r.levelno == logging.WARNING for r in reports)


def test_run_drops_over_the_bound_while_redis_is_down_and_never_crashes(tmp_path):
    # never started: a socket nobody listens on
    proc = RedisProcess(tmp_path / "redis", unix_socket=True, prefer_system=True)

    async def main() -> None:
        r = client(proc.url)
        trail = AuditTrail(r, queue_max=20)
        task = asyncio.create_task(trail.run())
        for i in range(30):
            trail.record("issued", seq=i)
        await until(lambda: trail.write_failures >= 3)
        for i in range(30, 40):
            trail.record("issued", seq=i)
        await until(lambda: trail.write_failures >= 4)
        assert not task.done()
        assert (trail.pending, trail.dropped) == (20, 20)
        assert [int(e["seq"]) for e in trail._queue] == list(range(20, 40))
        task.cancel()  # the last try at shutdown fails too: logged, not raised
        with pytest.raises(asyncio.CancelledError):
            await task
        assert trail.pending == 20
        await r.aclose()

    asyncio.run(main())


# --- tail and `tokensvc audit tail` -------------------------------------------------------


def test_cli_audit_tail_prints_the_last_entries_in_order(redis_url, capsys):
    write_records(redis_url, "issued", "refreshed", "reuse_detected", "revoked", "denied")
    assert cli.main(["audit", "tail", "--redis-url", redis_url, "-n", "3", "-o", "json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["event"] for line in lines] == ["reuse_detected", "revoked", "denied"]
    assert [line["seq"] for line in lines] == [2, 3, 4]  # numbers as numbers
    ids = [tuple(map(int, line["id"].split("-"))) for line in lines]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for line in lines:
        # epoch seconds, as every command's JSON has times (the stream keeps milliseconds)
        assert isinstance(line["ts"], float) and abs(line["ts"] - time.time()) < 3600
        assert set(line) == {"id", "ts", "event", "subject", "session_id", "seq"}
        assert all(value != "" for value in line.values())


def test_cli_audit_tail_uses_the_environment_and_count_zero(redis_url, capsys, monkeypatch):
    write_records(redis_url, *[f"e{i}" for i in range(25)])
    monkeypatch.setenv("TOKENSVC_REDIS_URL", redis_url)
    assert cli.main(["audit", "tail", "-o", "json"]) == 0
    events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert events == [f"e{i}" for i in range(5, 25)]  # the default: last 20
    assert cli.main(["audit", "tail", "-n", "0", "-o", "json"]) == 0
    assert capsys.readouterr().out == ""


def test_cli_audit_tail_reads_the_embedded_redis_of_a_data_dir(tmp_path, capsys):
    data_dir = tmp_path / "data"
    # what `tokensvc serve --data-dir data` without --redis-url starts
    proc = RedisProcess(data_dir / "redis", unix_socket=True, prefer_system=True).start()
    try:
        assert proc.unix_socket, "tmp path too long for a unix socket"
        write_records(proc.url, "issued", "locked")
        assert cli.main(["audit", "tail", "--data-dir", str(data_dir), "-o", "json"]) == 0
    finally:
        proc.stop()
    out, err = capsys.readouterr()
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["issued", "locked"]
    assert err == ""


def test_cli_audit_tail_without_a_running_redis_is_one_line_exit_2(tmp_path, capsys):
    assert cli.main(["audit", "tail", "--data-dir", str(tmp_path / "nothing")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tokensvc: cannot read the audit trail: no embedded Redis running")
    assert err.count("\n") == 1

    down = RedisProcess(tmp_path / "down", prefer_system=True)  # a port nobody listens on
    assert cli.main(["audit", "tail", "--redis-url", down.url]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tokensvc: cannot read the audit trail: redis unavailable")
    assert err.count("\n") == 1 and "Traceback" not in err

    assert cli.main(["audit", "tail", "--redis-url", "http://localhost"]) == 2
    assert capsys.readouterr().err.startswith("tokensvc: configuration error: --redis-url")


def test_tail_follow_picks_up_new_entries(redis_url):
    async def main() -> list[dict[str, object]]:
        r = client(redis_url)
        trail = AuditTrail(r)
        trail.record("issued", session_id="old")
        await trail.flush()
        lines: list[dict[str, object]] = []
        task = asyncio.create_task(
            tail(r, count=5, follow=True, write=lambda line: lines.append(json.loads(line)))
        )
        await until(lambda: len(lines) == 1)
        trail.record("revoked", session_id="old", reason="user")
        trail.record("issued", session_id="new")
        await trail.flush()
        await until(lambda: len(lines) == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await r.aclose()
        return lines

    lines = asyncio.run(main())
    assert [(line["event"], line["session_id"]) for line in lines] == [
        ("issued", "old"),
        ("revoked", "old"),
        ("issued", "new"),
    ]
    assert lines[1]["reason"] == "user"


def test_tail_follow_on_an_empty_stream_and_bytes_replies(redis_url):
    async def main() -> list[str]:
        raw = aioredis.Redis.from_url(redis_url)  # no decode_responses: bytes replies
        lines: list[str] = []
        task = asyncio.create_task(tail(raw, follow=True, write=lines.append))
        await asyncio.sleep(0)
        writer = client(redis_url)
        trail = AuditTrail(writer)
        trail.record("unlocked", subject="bob")
        await trail.flush()
        await until(lambda: len(lines) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await raw.aclose()
        await writer.aclose()
        return lines

    (line,) = asyncio.run(main())
    entry = json.loads(line)
    assert (entry["event"], entry["subject"]) == ("unlocked", "bob")


def test_cli_audit_tail_follow_ends_quietly_on_ctrl_c(redis_url, tmp_path):
    write_records(redis_url, "issued")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tokensvc",
            "audit",
            "tail",
            "-f",
            "-o",
            "json",
            "--redis-url",
            redis_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["event"] == "issued"
        write_records(redis_url, "revoked")
        assert json.loads(proc.stdout.readline())["event"] == "revoked"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert err == ""
    assert out == ""


def test_tail_of_unreachable_redis_raises_store_unavailable(tmp_path):
    down = RedisProcess(Path(tmp_path), prefer_system=True)

    async def main() -> None:
        r = client(down.url)
        try:
            with pytest.raises(StoreUnavailable):
                await tail(r, write=lambda line: None)
        finally:
            await r.aclose()

    asyncio.run(main())
