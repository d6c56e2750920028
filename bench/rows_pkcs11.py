"""Rows pkcs11.*: Issue and Refresh with the signing key in a PKCS#11 token (SoftHSM2, a
fresh token in the bench's data directory), under the standard load, each with the
server's CPU per request and its ratios to the local backend's rows of the same run
(``rps_x_local``, ``cpu_x_local``).

SoftHSM signs in-process (a library call, no network): its figure is the cost of the
PKCS#11 path itself (the thread hop, the session pool). A network HSM or a cloud KMS adds
a round trip per signature; with ``--pkcs11-sessions N`` at most N signatures are in flight
per process, so one process signs at most N / round-trip per second (8 sessions at 2 ms:
4 000/s), and more workers or sessions scale it until the HSM's own limit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.run import Bench, Server, process, tokensvc_args
from bench.service_rows import issue_request
from tokensvc.redis.embedded import free_port
from tokensvc_client.v1 import tokensvc_pb2 as pb

ROWS = ("pkcs11.issue", "pkcs11.refresh")
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
LABEL, PIN = "tokensvc-bench", "bench-pin-1"


def _token(root: Path) -> list[str]:
    """Initialise a fresh SoftHSM2 token under ``root``; returns the serve flags for it."""
    module = next((m for m in MODULES if Path(m).exists()), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise RuntimeError("SoftHSM2 missing: `make tools` installs it (.ci/tools.d/softhsm.sh)")
    shutil.rmtree(root, ignore_errors=True)
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # inherited by the server process
    subprocess.run(
        [util, "--init-token", "--free", "--label", LABEL, "--pin", PIN, "--so-pin", PIN + "-so"],
        check=True,
        capture_output=True,
    )
    pin = root / "pin"
    pin.write_text(PIN)
    pin.chmod(0o600)
    flags = {"--key-backend": "pkcs11", "--pkcs11-module": module, "--pkcs11-token": LABEL}
    flags["--pkcs11-pin-file"] = str(pin)
    return [part for pair in flags.items() for part in pair]


def _ratios(b: Bench, row: str, local: str) -> None:
    mine, base = b.rows[row], b.rows.get(local, {})
    if base.get("rps"):
        mine["rps_x_local"] = round(mine["rps"] / base["rps"], 2)
    if base.get("server_cpu_us") and mine.get("server_cpu_us"):
        mine["cpu_x_local"] = round(mine["server_cpu_us"] / base["server_cpu_us"], 2)


def run(b: Bench) -> None:
    if not b.redis_url.endswith("/0"):
        raise RuntimeError(f"pkcs11 rows need a numbered Redis database, not {b.redis_url}")
    redis_url = b.redis_url[:-2] + "/2"  # a key ring of its own: the other rows stay local
    flags = _token(b.data_dir / "softhsm")
    port = free_port()
    args = [*tokensvc_args(port, redis_url, b.data_dir), *flags]
    with process(args, "listening") as proc:
        server = Server(f"127.0.0.1:{port}", proc.pid)
        # the first key of the fresh ring was generated in the token (--key-backend pkcs11)
        n = b.n(2000)
        issue = issue_request()
        result = b.measure("pkcs11.issue", server, "Issue", [issue] * n, keep_replies=True)
        pairs = [pb.IssueResponse.FromString(r).tokens for r in result.replies]
        refresh = [
            pb.RefreshRequest(refresh_token=p.refresh_token).SerializeToString() for p in pairs
        ]
        b.measure("pkcs11.refresh", server, "Refresh", refresh)
    _ratios(b, "pkcs11.issue", "rpc.issue")
    _ratios(b, "pkcs11.refresh", "rpc.refresh")
    print(f"pkcs11 rows on {sys.platform}: SoftHSM2 in-process", file=sys.stderr)
