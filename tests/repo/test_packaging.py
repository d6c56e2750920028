"""What can be checked of the Docker image and packaging without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_copies_files_that_exist():
    for op, arg in _instructions():
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), source


def test_dockerfile_is_multistage_non_root_with_healthcheck_and_entrypoint():
    ops = _instructions()
    assert sum(op == "FROM" for op, _ in ops) == 2
    assert all("slim" in arg for op, arg in ops if op == "FROM")
    user = [arg for op, arg in ops if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert ("ENTRYPOINT", '["tokensvc", "serve"]') in ops
    assert any(op == "HEALTHCHECK" and '"health"' in arg for op, arg in ops)
    (exposed,) = [arg.split() for op, arg in ops if op == "EXPOSE"]
    env = " ".join(arg for op, arg in ops if op == "ENV")
    port = re.search(r"TOKENSVC_LISTEN=\S+:(\d+)", env)
    assert port and exposed[0] == port.group(1)  # gRPC first (JWKS, metrics: test_deploy)
    health = next(arg for op, arg in ops if op == "HEALTHCHECK")
    assert f":{port.group(1)}" in health


def test_entrypoint_and_healthcheck_commands_run():
    exe = shutil.which("tokensvc") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "tokensvc"]
    assert (
        subprocess.run([*cmd, "serve", "--help"], capture_output=True, timeout=60).returncode == 0
    )
    # nothing listens on this port: the health probe must fail cleanly, not crash
    from tokensvc.redis.embedded import free_port

    probe = subprocess.run(
        [*cmd, "health", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 1 and "Traceback" not in probe.stderr


def test_client_distribution_does_not_need_redis_or_the_otel_sdk():
    requires = (ROOT / "clients/python/pyproject.toml").read_text()
    deps = requires.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "redis" not in deps and "opentelemetry" not in deps
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('redis', 'opentelemetry', 'tokensvc'):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import tokensvc_client, tokensvc_client.verifier\n"
        "from tokensvc_client.v1 import tokensvc_pb2_grpc\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
