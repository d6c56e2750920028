"""The web helper is an extra: the base client's dependencies and imports do not change."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_base_client_needs_only_grpcio_protobuf_jwcrypto_and_web_is_an_extra():
    project = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == {"grpcio", "protobuf", "jwcrypto"}
    assert _names(project["optional-dependencies"]["web"]) == {"starlette", "cryptography"}


def test_importing_the_base_client_never_imports_the_web_stack():
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('starlette', 'uvicorn', 'httpx', 'httpx2'):\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import tokensvc_client\n"
        "from tokensvc_client import TokenClient, AsyncTokenClient, AuthInterceptor\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
