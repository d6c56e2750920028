"""The operator's first hour: tokens from the shell, revoke that says what it did, hints
that name the real fix, and a server certificate whose dates are checked."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import os
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from jwcrypto import jwk

from tests.support import ServerThread
from tokensvc.cli import main as cli
from tokensvc.cli.devcerts import DevCA
from tokensvc.config import Settings
from tokensvc.config import env as config_env
from tokensvc.errors import ConfigError
from tokensvc.keys.ring import KeyRing, KeyRingError, load_kek
from tokensvc.observe import metrics
from tokensvc.redis.embedded import RedisProcess
from tokensvc.security import tls

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def _json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    out = capsys.readouterr().out
    (line,) = out.splitlines()
    return dict(json.loads(line))


def test_issue_refresh_introspect_from_the_shell(tokensvc, capsys, monkeypatch):
    where = ["--insecure", "--target", tokensvc.target]
    assert cli.main(["issue", "alice", "--role", "reader", *where, "-o", "json"]) == 0
    pair = _json(capsys)
    assert pair["access_token"].count(".") == 2 and pair["session_id"]
    assert isinstance(pair["access_expires_at"], int)

    # the refresh token from standard input (not the shell's history)
    monkeypatch.setattr(sys, "stdin", io.StringIO(pair["refresh_token"] + "\n"))
    assert cli.main(["refresh", *where, "-o", "json"]) == 0
    rotated = _json(capsys)
    assert rotated["session_id"] == pair["session_id"]
    assert rotated["refresh_token"] != pair["refresh_token"]

    assert cli.main(["introspect", rotated["access_token"], *where, "-o", "json"]) == 0
    info = _json(capsys)
    assert info["active"] is True and info["subject"] == "alice" and info["roles"] == ["reader"]
    assert cli.main(["introspect", "not-a-token", *where]) == 1  # inactive: exit 1
    assert "ACTIVE" in capsys.readouterr().out

    # the table: one field a line (tokens are too wide for columns)
    assert cli.main(["issue", "bob", *where]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines][:2] == ["ACCESS_TOKEN", "REFRESH_TOKEN"]


def test_a_token_command_without_a_token_is_exit_2(tokensvc, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(["refresh", "--insecure", "--target", tokensvc.target]) == 2
    assert "no token given" in capsys.readouterr().err


def test_revoke_says_what_was_revoked_and_fails_when_nothing_matched(tokensvc, capsys):
    where = ["--insecure", "--target", tokensvc.target]
    assert cli.main(["issue", "carol", *where, "-o", "json"]) == 0
    pair = _json(capsys)

    assert cli.main(["revoke", "--token", "garbage", *where, "-o", "json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"revoked_sessions": 0, "revoked_access_tokens": 0}
    assert "nothing revoked" in captured.err

    assert cli.main(["revoke", "--token", pair["access_token"], *where]) == 0
    assert "revoked the access token" in capsys.readouterr().err
    assert cli.main(["introspect", pair["access_token"], *where]) == 1
    capsys.readouterr()

    assert cli.main(["revoke", "--token", pair["refresh_token"], *where]) == 0
    assert "revoked 1 session(s)" in capsys.readouterr().err
    assert cli.main(["sessions", "revoke", pair["session_id"], *where]) == 1  # already ended
    assert "nothing revoked" in capsys.readouterr().err


def _keys_list(target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """A subprocess, so what gRPC prints is what a user would see."""
    return subprocess.run(
        [sys.executable, "-m", "tokensvc", "keys", "list", "--target", target, *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tls_hints_name_the_flag_that_fixes_it(mtls_service, dev_pki):
    svc = mtls_service("")
    ca = str(dev_pki["server"].ca)

    untrusted = _keys_list(svc.target)  # no --ca: the system roots do not know the dev CA
    assert untrusted.returncode == 1
    assert "pass --ca" in untrusted.stderr and "--insecure" not in untrusted.stderr

    no_certificate = _keys_list(svc.target, "--ca", ca)  # mTLS server, no client certificate
    assert no_certificate.returncode == 1
    assert "requires a client certificate" in no_certificate.stderr
    assert "pass --cert and --key" in no_certificate.stderr
    assert "is tokensvc running" not in no_certificate.stderr


def _expired_server(tmp_path: Path) -> tuple[grpc.Server, int, Path]:
    """A bare gRPC server presenting an expired certificate (tokensvc refuses to serve one)."""
    ca = DevCA(tmp_path)
    issued = ca.issue("old", hosts=("127.0.0.1",), server=True, valid=(NOW - 40 * DAY, NOW - DAY))
    server = grpc.server(futures.ThreadPoolExecutor(2))
    creds = grpc.ssl_server_credentials([(issued.key.read_bytes(), issued.cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port, ca.ca_path


def test_an_expired_server_certificate_is_named(tmp_path):
    server, port, ca = _expired_server(tmp_path)
    try:
        done = _keys_list(f"127.0.0.1:{port}", "--ca", str(ca))
    finally:
        server.stop(None)
    assert done.returncode == 1
    assert "has expired or is not valid yet" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("valid", "words"),
    [((NOW - 40 * DAY, NOW - DAY), "has expired"), ((NOW + DAY, NOW + 40 * DAY), "not valid yet")],
)
def test_serve_refuses_a_certificate_outside_its_dates(tmp_path, valid, words):
    issued = DevCA(tmp_path).issue("srv", hosts=("127.0.0.1",), server=True, valid=valid)
    settings = Settings(insecure=False, tls_cert=issued.cert, tls_key=issued.key)
    with pytest.raises(tls.TlsFilesError) as refused:
        tls.server_credentials(settings)
    message = str(refused.value)
    assert words in message and valid[1].date().isoformat() in message


def test_a_certificate_about_to_expire_is_a_warning(tmp_path, caplog):
    issued = DevCA(tmp_path).issue("srv", hosts=("127.0.0.1",), server=True, valid=(NOW, NOW + DAY))
    settings = Settings(insecure=False, tls_cert=issued.cert, tls_key=issued.key)
    with caplog.at_level("INFO", logger="tokensvc.tls"):
        tls.server_credentials(settings)
    (record,) = [r for r in caplog.records if "expires in" in r.getMessage()]
    assert record.levelname == "WARNING"


def test_an_expired_replacement_is_not_loaded(tmp_path, caplog):
    ca = DevCA(tmp_path)
    good = ca.issue("srv", hosts=("127.0.0.1",), server=True)
    reloader = tls.CertificateReloader(good.cert, good.key, None)
    expired = ca.issue("old", hosts=("127.0.0.1",), server=True, valid=(NOW - 9 * DAY, NOW - DAY))
    good.cert.write_bytes(expired.cert.read_bytes())
    good.key.write_bytes(expired.key.read_bytes())
    with caplog.at_level("WARNING", logger="tokensvc.tls"):
        assert reloader._check() is None  # keeps serving the valid certificate
    assert any("has expired" in r.getMessage() for r in caplog.records)


def test_the_certificate_life_is_a_gauge(tmp_path):
    issued = DevCA(tmp_path).issue("srv", hosts=("x",), server=True, valid=(NOW, NOW + 3 * DAY))
    left = metrics.certificate_seconds_left(issued.cert, NOW.timestamp())
    assert left is not None and abs(left - 3 * 86400) < 2
    assert metrics.certificate_seconds_left(tmp_path / "missing.pem", 0) is None


def test_plaintext_server_hint_is_unchanged(tokensvc: ServerThread):
    done = _keys_list(tokensvc.target)
    assert done.returncode == 1 and "pass --insecure" in done.stderr


# --- every bad value: one line, exit 2 -------------------------------------------------------


def _serve(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "tokensvc", "serve", "--listen", "127.0.0.1:0", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_a_redis_url_with_a_bad_port_is_one_line(tmp_path):
    done = _serve("--insecure", "--redis-url", "redis://127.0.0.1:notaport/0", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--redis-url" in done.stderr and "notaport" in done.stderr


def test_a_sentinel_naming_no_known_master_is_a_short_line(tmp_path):
    url = f"redis+sentinel://127.0.0.1:{_closed_port()}/nomaster"
    done = _serve("--insecure", "--redis-url", url, "--data-dir", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("tokensvc: cannot start")]
    assert "no Sentinel of the URL knows a primary" in line
    assert len(line) < 400 and "ConnectionPool" not in line


def test_a_garbage_kek_file_says_what_it_must_be(tmp_path):
    kek = tmp_path / "kek.json"
    kek.write_text("zzqq-not-json\n")
    kek.chmod(0o600)
    with pytest.raises(KeyRingError) as refused:
        load_kek(kek, tmp_path)
    assert str(refused.value).endswith('"k": <32 random bytes, base64url>})')
    assert "zzqq" not in str(refused.value)  # the file's content is not echoed
    kek.write_text(jwk.JWK.generate(kty="oct", size=128).export())
    with pytest.raises(KeyRingError, match="not a 256-bit oct key"):
        load_kek(kek, tmp_path)


@pytest.mark.parametrize("spelling", ["1", "true", "YES", "on", "y"])
def test_environment_booleans_accept_the_usual_spellings(spelling):
    assert config_env.load(None, {"TOKENSVC_INSECURE": spelling}).insecure is True


@pytest.mark.parametrize("spelling", ["0", "false", "No", "off", ""])
def test_environment_booleans_false(spelling):
    assert config_env.env_flag("TOKENSVC_INSECURE", spelling) is False
    with pytest.raises(ConfigError, match="TLS needs"):  # not insecure: TLS files wanted
        config_env.load(None, {"TOKENSVC_INSECURE": spelling})


@pytest.mark.parametrize("spelling", ["maybe", "2", "enabled"])
def test_environment_booleans_refuse_the_rest(spelling, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=f"TOKENSVC_INSECURE={spelling!r} is not a boolean"):
        config_env.load(None, {"TOKENSVC_INSECURE": spelling})
    monkeypatch.setenv("TOKENSVC_INSECURE", spelling)  # the CLI's --insecure default too
    assert cli.main(["health"]) == 2
    assert "is not a boolean" in capsys.readouterr().err


def test_unknown_tokensvc_variables_are_named():
    env = {
        "TOKENSVC_REDIS_UTL": "redis://x",  # a typo
        "TOKENSVC_REDIS_URL": "redis://x",
        "TOKENSVC_TARGET": "x:1",
        "TOKENSVC_HEALTH_CA": "ca.pem",
        # what Kubernetes injects for a Service named tokensvc
        "TOKENSVC_SERVICE_HOST": "10.0.0.1",
        "TOKENSVC_PORT_50051_TCP_ADDR": "10.0.0.1",
        "TOKENSVC_PORT": "tcp://10.0.0.1:50051",
        "OTHER": "1",
    }
    assert config_env.unknown_variables(env) == ["TOKENSVC_REDIS_UTL"]


def _closed_port() -> int:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = int(closed.getsockname()[1])
    closed.close()  # nothing listens there
    return port


def test_serve_warns_about_an_unknown_variable(tmp_path):
    url = f"redis://127.0.0.1:{_closed_port()}/0"  # gets past the configuration, then stops
    done = _serve("--insecure", "--redis-url", url, env={"TOKENSVC_REDIS_UTL": "x"}, cwd=tmp_path)
    assert done.returncode == 2
    (warning,) = [json.loads(x) for x in done.stderr.splitlines() if "TOKENSVC_REDIS_UTL" in x]
    assert warning["level"] == "WARNING" and "unknown environment variable" in warning["msg"]


def test_keys_rewrap_finds_the_embedded_redis_of_a_data_dir(tmp_path, capsys):
    data_dir = tmp_path / "d"
    new_kek = tmp_path / "new.json"
    new_kek.write_text(jwk.JWK.generate(kty="oct", size=256).export())
    new_kek.chmod(0o600)
    proc = RedisProcess(data_dir / "redis", unix_socket=True, prefer_system=True).start()
    try:
        assert proc.unix_socket, "tmp path too long for a unix socket"

        async def seed() -> None:  # a key ring under the development KEK, as `make run` has
            client = aioredis.Redis.from_url(proc.url)
            try:
                await KeyRing(client, load_kek(None, data_dir)).load()
            finally:
                await client.aclose()

        asyncio.run(seed())
        argv = ["keys", "rewrap", "--data-dir", str(data_dir), "--kek-file", str(new_kek)]
        assert cli.main([*argv, "-o", "json"]) == 0
        assert json.loads(capsys.readouterr().out)["rewrapped_keys"] >= 1

        async def check() -> None:  # the new KEK alone now opens the ring
            client = aioredis.Redis.from_url(proc.url)
            try:
                await KeyRing(client, load_kek(new_kek, data_dir)).load()
            finally:
                await client.aclose()

        asyncio.run(check())
    finally:
        proc.stop()


def test_audit_tail_and_rewrap_describe_themselves(capsys):
    for argv in (["audit", "tail", "--help"], ["keys", "rewrap", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        usage = capsys.readouterr().out
        assert "Reads Redis directly" in usage or "Talks to Redis directly" in usage
        assert "--data-dir" in usage


def test_exchange_from_the_shell(tokensvc, capsys, monkeypatch):
    """Plaintext development mode: no identities, so the act claim names the address."""
    where = ["--insecure", "--target", tokensvc.target]
    assert cli.main(["issue", "alice", "--role", "a", "--role", "b", *where, "-o", "json"]) == 0
    pair = _json(capsys)
    monkeypatch.setattr(sys, "stdin", io.StringIO(pair["access_token"] + "\n"))
    argv = ["exchange", "--audience", "orders", "--role", "a", *where, "-o", "json"]
    assert cli.main(argv) == 0
    got = _json(capsys)
    assert got["session_id"] == pair["session_id"] and got["roles"] == ["a"]
    assert got["token_type"] == "Bearer" and got["issued_token_type"].endswith(":access_token")
    assert cli.main(["introspect", got["access_token"], *where, "-o", "json"]) == 0
    assert _json(capsys)["audience"] == ["orders"]
    # wider than the subject token: refused, exit 1 with the reason
    argv = ["exchange", pair["access_token"], "--audience", "x", "--role", "admin", *where]
    assert cli.main(argv) == 1
    assert "subset" in capsys.readouterr().err


def test_a_key_id_starting_with_a_dash_is_given_after_double_dash():
    """A kid is base64url: a quarter of them start with "-" (argparse would take a flag)."""
    args = cli.build_parser().parse_args(["keys", "retire", "--insecure", "--", "-AbC_d"])
    assert args.kid == "-AbC_d" and args.insecure
