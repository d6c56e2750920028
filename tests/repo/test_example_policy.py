"""examples/policy.toml with the development PKI (`make certs`): every admin command the
docs show works over mTLS with the admin certificate, Issue with the login one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokensvc.cli import main as cli
from tokensvc_client import TokenClient

POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.toml"


@pytest.fixture
def served(mtls_service, dev_pki):
    svc = mtls_service(POLICY.read_text())
    admin = dev_pki["admin"]
    flags = ["--target", svc.target, "--ca", str(dev_pki["server"].ca)]
    return svc, [*flags, "--cert", str(admin.cert), "--key", str(admin.key)]


def _run(capsys, *argv: str) -> list[dict]:
    flags, dashes, positional = list(argv), [], []
    if "--" in flags:  # "--output json" goes before the end of the options
        at = flags.index("--")
        flags, dashes, positional = flags[:at], ["--"], flags[at + 1 :]
    code = cli.main([*flags, "--output", "json", *dashes, *positional])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_every_readme_admin_command_works_with_the_example_policy(served, dev_pki, capsys):
    svc, admin = served
    login = dev_pki["login"]
    ca = str(dev_pki["server"].ca)
    with TokenClient(svc.target, ca=ca, cert=str(login.cert), key=str(login.key)) as tokens:
        pair = tokens.issue("alice", client_id="web", session_label="laptop")

    keys = _run(capsys, "keys", "list", *admin)
    assert keys and all("kid" in key for key in keys)
    _run(capsys, "keys", "rotate", *admin)
    pending = [k["kid"] for k in _run(capsys, "keys", "list", *admin) if k["state"] == "pending"]
    assert pending
    # a kid is base64url: it may start with "-", which only "--" keeps from being a flag
    _run(capsys, "keys", "retire", *admin, "--", pending[0])

    sessions = _run(capsys, "sessions", "list", "alice", *admin)
    assert [s["session_id"] for s in sessions] == [pair.session_id]
    _run(capsys, "sessions", "revoke", pair.session_id, *admin)
    _run(capsys, "revoke", "--subject", "alice", *admin)
    _run(capsys, "lock", "mallory", *admin)
    _run(capsys, "unlock", "mallory", *admin)
    assert _run(capsys, "health", *admin) == [{"status": "SERVING"}]
