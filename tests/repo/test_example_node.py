"""examples/node/issue_introspect.js (docs/client.md's "Other languages" example) issues and
introspects a token from Node against a real tokensvc on loopback: over mTLS as a login
workload, and over plaintext as against `make run`.

Node and the example's packages come from .ci/tools.d/node-example.sh (`make tools`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support import MtlsService, ServerThread
from tokensvc.cli.devcerts import DEFAULT_WORKLOADS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/node"
POLICY = f'[rpc.Issue]\nallow = ["{DEFAULT_WORKLOADS["login"]}"]\n'


def _run_as(svc: MtlsService, workload: str, subject: str) -> subprocess.CompletedProcess[str]:
    """The example over mTLS with ``workload``'s certificate, the server named as a real
    caller would name it (Node warns about an IP address as TLS server name)."""
    mine = svc.pki[workload]
    return _run(
        f"localhost:{svc.server.port}",
        subject,
        TOKENSVC_CA=str(mine.ca),
        TOKENSVC_CERT=str(mine.cert),
        TOKENSVC_KEY=str(mine.key),
    )


def _run(target: str, subject: str, **env: str) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    assert node and (EXAMPLE / "node_modules/@grpc/grpc-js").is_dir(), (
        "node or the example's packages are missing: run `make tools`"
    )
    return subprocess.run(
        [node, "issue_introspect.js", target, subject],
        cwd=EXAMPLE,
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _check(result: subprocess.CompletedProcess[str], subject: str) -> None:
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["active"] is True
    assert (out["token_type"], out["subject"], out["roles"]) == ("access", subject, ["reader"])
    assert out["session_id"] and out["expires_at"] > 0
    assert "eyJ" not in result.stdout  # the example prints no token


def test_node_example_over_mtls(mtls_service: Callable[..., MtlsService]) -> None:
    _check(_run_as(mtls_service(POLICY), "login", "alice"), "alice")


def test_node_example_plaintext_and_a_usage_error(tokensvc: ServerThread) -> None:
    _check(_run(tokensvc.target, "bob"), "bob")
    refused = _run(tokensvc.target, "")
    assert refused.returncode != 0 and "usage" in refused.stderr


def test_node_example_reports_the_status_of_a_refused_call(
    mtls_service: Callable[..., MtlsService],
) -> None:
    result = _run_as(mtls_service(POLICY), "orders", "alice")  # orders may not Issue
    assert result.returncode == 1
    assert result.stderr.startswith("tokensvc: PERMISSION_DENIED: ")
