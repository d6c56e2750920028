"""The examples of the README and docs/ run: the first client example (README and
docs/client.md) as written against a real server; the interceptor, feed, call-credentials
and web blocks are excerpts of the programs they name, which run against a real server; the
KEK recipe (docs/operations.md); the mTLS client blocks (docs/security.md)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tokensvc.keys.ring import load_kek

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: the README and every page of the manual, where the checked blocks live
PAGES = [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", [README, DOCS / "client.md"], ids=lambda p: p.name)
def test_readme_token_client_example_runs(tokensvc, page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    example = blocks[0].replace("127.0.0.1:50051", tokensvc.target)
    namespace: dict[str, object] = {}
    exec(compile(example, page.name, "exec"), namespace)
    info = namespace["info"]
    assert info.active and info.subject == "alice"


EXCERPT = re.compile(r"<!-- excerpt: (\S+) -->\n```python\n(.*?)```", re.S)


def test_readme_excerpts_are_in_their_programs():
    """Each block marked as an excerpt appears, line by line and in order, in the program
    it names (which test_protected_service_example_runs runs)."""
    excerpts = [found for page in PAGES for found in EXCERPT.findall(page.read_text())]
    assert len(excerpts) >= 3
    assert EXCERPT.findall(README.read_text()), "the README shows the interceptor excerpt"
    for path, block in excerpts:
        program = [line.strip() for line in (ROOT / path).read_text().splitlines()]
        at = 0
        for line in (line.strip() for line in block.splitlines() if line.strip()):
            assert line in program[at:], f"{path} lacks {line!r}"
            at = program.index(line, at) + 1


def test_protected_service_example_runs(tokensvc):
    env = dict(os.environ, TOKENSVC=tokensvc.target, TOKENSVC_ISSUER="https://tokensvc.test")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "protected_service.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "order 42 of alice",
        "UNAUTHENTICATED invalid token: revoked",
    ]


def test_call_chain_example_runs(tokensvc):
    """examples/call_chain.py (docs/call-chains.md) against a plaintext tokensvc, as against
    `make run`: billing sees alice, the edge's transaction and two exchanges; revoking the
    session ends the chain at the first hop."""
    env = dict(os.environ, TOKENSVC=tokensvc.target, TOKENSVC_ISSUER="https://tokensvc.test")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "call_chain.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    edge = "insecure:127.0.0.1"  # plaintext mode: the workloads have no mTLS identity
    assert done.stdout.splitlines() == [
        "billing saw alice with scope orders:read and tctx {'order': '42'}",
        f"in the edge's transaction: True, requested by {edge}",
        f"through 2 exchanges: {edge} <- {edge}",
        "after revoking the session: UNAUTHENTICATED",
    ]


def test_readme_kek_recipe_writes_a_private_kek(tmp_path):
    (recipe,) = [
        b
        for b in re.findall(r"```sh\n(.*?)```", (DOCS / "operations.md").read_text(), re.S)
        if "kek.json" in b
    ]
    command = recipe.strip().replace("python -c", f"{shlex.quote(sys.executable)} -c")
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True, timeout=60)
    kek = tmp_path / ".tokensvc" / "kek.json"  # ignored by git (.gitignore)
    assert ".tokensvc/" in (ROOT / ".gitignore").read_text().splitlines()
    assert kek.stat().st_mode & 0o777 == 0o600
    assert load_kek(kek, tmp_path).get("kty") == "oct"


def test_readme_mtls_client_blocks_run_with_the_example_policy(mtls_service, dev_pki):
    """The TLS section's client (the login workload) and the certificate-bound Issue,
    run in sequence as written, against `make certs` files and examples/policy.toml."""
    svc = mtls_service((ROOT / "examples" / "policy.toml").read_text())
    page = DOCS / "security.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    (client,) = [b for b in blocks if 'cert=".tokensvc/certs/login.pem"' in b]
    (bound,) = [b for b in blocks if "certificate_thumbprint" in b]
    certs = str(dev_pki["server"].ca.parent) + "/"
    namespace: dict[str, object] = {}
    for block in (client, bound):
        code = block.replace(".tokensvc/certs/", certs).replace("127.0.0.1:50051", svc.target)
        exec(compile(code, page.name, "exec"), namespace)
    pair = namespace["pair"]
    info = namespace["login"].introspect(pair.access_token)  # type: ignore[attr-defined]
    assert info.subject == "orders-svc" and info.cnf_x5t_s256
    namespace["login"].close()  # type: ignore[attr-defined]
