"""A token that fails: Issue and Refresh answer UNAVAILABLE (never a token signed
elsewhere, never a burnt refresh token), health turns NOT_SERVING and back, and a token,
PIN or key object that cannot be found at start-up is one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwcrypto import jwk

from tests.keys.conftest import UNLIMITED, kid_of
from tests.support import wait_until
from tokensvc.keys.ring_state import RING_KEY
from tokensvc_client.v1 import tokensvc_pb2 as pb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(channel: grpc.Channel) -> int:
    check = health_pb2_grpc.HealthStub(channel).Check
    return check(health_pb2.HealthCheckRequest(service="")).status


def test_token_removed_under_load_is_unavailable_and_recovers(
    hsm_settings, start_server, softhsm, caplog
):
    srv = start_server(hsm_settings(**UNLIMITED))
    channel = srv.channel()
    stub = srv.stub()
    pair = stub.Issue(pb.IssueRequest(subject="load-0")).tokens
    kid = kid_of(pair.access_token)
    codes: Counter[str] = Counter()
    kids: set[str] = set()
    stop = threading.Event()

    def load(worker: int) -> None:
        local = srv.stub()
        for i in range(5000):  # bounded; stops when the test is done
            if stop.is_set():
                return
            try:
                reply = local.Issue(pb.IssueRequest(subject=f"load-{worker}-{i}"))
                kids.add(kid_of(reply.tokens.access_token))
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
            time.sleep(0.005)

    workers = [threading.Thread(target=load, args=(n,)) for n in range(3)]
    for worker in workers:
        worker.start()
    token_dir = softhsm.token_path()
    away = softhsm.tokendir.parent / "away"  # out of the token directory SoftHSM scans
    try:
        wait_until(lambda: codes["OK"] > 0, what="load running")
        token_dir.rename(away)  # the token is gone: its objects, its PIN, everything
        wait_until(lambda: codes["UNAVAILABLE"] > 0, what="UNAVAILABLE under load")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_until(lambda: _health(channel) == NOT_SERVING, what="NOT_SERVING")
    finally:
        if away.exists():
            away.rename(token_dir)
    wait_until(lambda: _health(channel) == SERVING, what="SERVING again")
    before = codes["OK"]
    wait_until(lambda: codes["OK"] > before + 5, what="issuing again")
    stop.set()
    for worker in workers:
        worker.join(30)
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert kids == {kid}  # every token the token's key signed, none signed elsewhere
    # the refresh token refused during the outage was not consumed
    again = stub.Refresh(pb.RefreshRequest(refresh_token=pair.refresh_token)).tokens
    assert kid_of(again.access_token) == kid
    assert "cannot sign" in caplog.text and "PKCS#11" in caplog.text  # the reason, logged
    channel.close()


def _serve(redis_url: str, tmp_path, *extra: str) -> subprocess.CompletedProcess[str]:
    kek = tmp_path / "data" / "dev-kek.json"  # the KEK of a server a test ran before
    if not kek.exists():
        kek = tmp_path / "kek.json"
        kek.write_text(jwk.JWK.generate(kty="oct", size=256).export())
        kek.chmod(0o600)
    argv = ["serve", "--insecure", "--listen", "127.0.0.1:0", "--redis-url", redis_url]
    argv += ["--data-dir", str(tmp_path / "data"), "--kek-file", str(kek), *extra]
    return subprocess.run(
        [sys.executable, "-m", "tokensvc", *argv], capture_output=True, text=True, timeout=60
    )


def _pkcs11_flags(softhsm, **changes: str) -> list[str]:
    flags = {
        "--key-backend": "pkcs11",
        "--pkcs11-module": str(softhsm.module),
        "--pkcs11-token": softhsm.label,
        "--pkcs11-pin-file": str(softhsm.pin_file),
        **changes,
    }
    return [part for pair in flags.items() for part in pair]


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # one line for the operator; the other lines are the JSON log (before the failure)
    (line,) = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert done.stderr.splitlines()[-1] == line
    assert line.startswith("tokensvc: cannot start: ")
    return line


def test_wrong_pin_at_start_up_is_one_line_exit_2(redis_url, tmp_path, softhsm):
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-the-pin\n")
    wrong.chmod(0o600)
    line = _one_line(
        _serve(redis_url, tmp_path, *_pkcs11_flags(softhsm, **{"--pkcs11-pin-file": str(wrong)}))
    )
    assert "refused the PIN" in line and str(wrong) in line
    assert "not-the-pin" not in line


def test_missing_token_at_start_up_is_one_line_exit_2(redis_url, tmp_path, softhsm):
    line = _one_line(
        _serve(redis_url, tmp_path, *_pkcs11_flags(softhsm, **{"--pkcs11-token": "no-such"}))
    )
    assert "token=no-such" in line and "NoSuchToken" in line


def test_active_key_object_missing_at_start_up_is_one_line_exit_2(
    hsm_settings, start_server, redis_url, tmp_path, softhsm
):
    settings = hsm_settings()
    srv = start_server(settings)
    kid = kid_of(srv.stub().Issue(pb.IssueRequest(subject="x")).tokens.access_token)
    srv.stop()
    client = redis.Redis.from_url(redis_url)
    record = json.loads(client.hget(RING_KEY, kid))
    client.close()
    # the object is gone from the token (destroyed by hand), the ring still names it
    from tests.keys.conftest import destroy_objects

    destroy_objects(softhsm, kid)
    assert record["backend"] == "pkcs11"
    line = _one_line(_serve(redis_url, tmp_path, *_pkcs11_flags(softhsm)))
    assert f"kid={kid}" in line and "no private key object" in line
