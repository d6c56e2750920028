"""`make run` on a fresh clone installs the runtime only; `make test` the dev tools too."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _planned_installs(target: str, venv: Path) -> list[str]:
    """The pip install commands `make TARGET` would run for a fresh virtualenv."""
    plan = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line for line in plan.splitlines() if "pip install" in line and "-e" in line]


def test_make_run_installs_the_runtime_only(tmp_path):
    installs = _planned_installs("run", tmp_path / "fresh")
    assert installs and all("dev" not in line for line in installs)
    assert any("[embedded]" in line for line in installs)


def test_make_test_installs_the_dev_tools(tmp_path):
    installs = _planned_installs("test", tmp_path / "fresh")
    assert any("[dev,embedded]" in line for line in installs)


def _plan(*argv: str) -> str:
    return subprocess.run(
        ["make", "-n", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_make_run_takes_the_port_and_says_what_to_do_next():
    plan = _plan("run", "PORT=50052")
    assert "tokensvc serve --insecure --listen 127.0.0.1:50052" in plan
    assert "tokensvc health --insecure --target 127.0.0.1:50052" in plan
    assert "tokensvc issue alice --insecure --target 127.0.0.1:50052" in plan


def test_make_web_installs_the_web_extra_and_runs_the_example():
    plan = _plan("web", "PORT=50052")
    assert "./clients/python[web]" in plan and "uvicorn" in plan
    assert "TOKENSVC_TARGET=127.0.0.1:50052" in plan and "examples/web/app.py" in plan
