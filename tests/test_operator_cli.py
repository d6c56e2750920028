"""The operator's first hour: tokens from the shell, revoke that says what it did, hints
that name the real fix, and a server certificate whose dates are checked."""

from __future__ import annotations

import datetime
import io
import json
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support import ServerThread
from tokensvc.cli import main as cli
from tokensvc.cli.devcerts import DevCA
from tokensvc.config import Settings
from tokensvc.observe import metrics
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
