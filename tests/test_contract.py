"""The contract outside Python: `buf breaking` (run by `make check-contract`) rejects a change
that would break existing callers and accepts an additive one, and the README's Envoy
configuration fetches the JWKS from where tokensvc really serves it.

buf comes from .ci/tools.d/buf.sh (`make tools`); the checks run it on a copy of protos/ so
the committed contract is never touched.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tokensvc.config import Settings
from tokensvc.http_jwks import JWKS_PATH

ROOT = Path(__file__).resolve().parents[1]
BUF = ROOT / ".tools/buf/node_modules/.bin/buf"
PROTO = Path("protos/tokensvc_client/v1/tokensvc.proto")
BASELINE = "protos/released/tokensvc-v1.binpb"


@pytest.fixture
def contract_copy(tmp_path: Path) -> Path:
    assert BUF.exists(), "buf is missing: run `make tools` (.ci/tools.d/buf.sh)"
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    return tmp_path


def _edit(root: Path, old: str, new: str) -> None:
    path = root / PROTO
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


def _breaking(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", BASELINE],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        # a caller still sending field 1 would be misread
        (
            "  string subject = 1;\n  repeated string roles = 2;",
            "  repeated string roles = 2;",
            'Previously present field "1" with name "subject" on message "IssueRequest"',
        ),
        (
            "  int64 revoked_sessions = 1;\n}\n\nmessage IntrospectRequest",
            "  int32 revoked_sessions = 1;\n}\n\nmessage IntrospectRequest",
            "changed type",
        ),
        (
            "  rpc Introspect(IntrospectRequest) returns (IntrospectResponse);\n",
            "",
            'Previously present RPC "Introspect"',
        ),
    ],
)
def test_buf_breaking_rejects_what_breaks_callers(
    contract_copy: Path, old: str, new: str, complaint: str
) -> None:
    _edit(contract_copy, old, new)
    result = _breaking(contract_copy)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def test_buf_breaking_accepts_a_new_field_and_the_committed_contract(contract_copy: Path) -> None:
    assert _breaking(contract_copy).returncode == 0, "the committed contract breaks callers"
    _edit(
        contract_copy,
        "  string cnf_x5t_s256 = 15;\n}",
        "  string cnf_x5t_s256 = 15;\n  string note = 99;\n}",
    )
    result = _breaking(contract_copy)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the README's Envoy example --------------------------------------------------------


def _envoy_config() -> dict[str, Any]:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "envoy.filters.http.jwt_authn" in b]
    config: dict[str, Any] = yaml.safe_load(block)
    return config


def _deployed_http_port() -> int:
    env = (ROOT / "deploy/kubernetes/config.env").read_text()
    (listen,) = re.findall(r"^TOKENSVC_HTTP_LISTEN=(.+)$", env, re.M)
    return int(listen.rsplit(":", 1)[1])


def test_readme_envoy_example_fetches_the_jwks_from_the_https_listener() -> None:
    config = _envoy_config()
    jwt_filter, router = config["http_filters"]
    assert jwt_filter["typed_config"]["@type"].endswith("jwt_authn.v3.JwtAuthentication")
    assert router["name"] == "envoy.filters.http.router"  # jwt_authn must come before it
    providers = jwt_filter["typed_config"]["providers"]
    provider = providers["tokensvc"]
    jwks = provider["remote_jwks"]
    uri = urlsplit(jwks["http_uri"]["uri"])
    assert uri.scheme == "https"  # the listener is HTTPS with the service's certificate
    assert uri.path == JWKS_PATH
    assert uri.port == _deployed_http_port()
    assert uri.hostname == urlsplit(provider["issuer"]).hostname
    # the cache never outlives the max age tokensvc publishes keys ahead of using them
    (max_age,) = [f.default for f in dataclasses.fields(Settings) if f.name == "jwks_max_age"]
    assert jwks["cache_duration"] == f"{max_age}s"

    (cluster,) = [c for c in config["clusters"] if c["name"] == jwks["http_uri"]["cluster"]]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == (uri.hostname, uri.port)
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("tls.v3.UpstreamTlsContext")
    assert tls["sni"] == uri.hostname
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"]
    assert validation["match_typed_subject_alt_names"][0]["matcher"]["exact"] == uri.hostname

    rules = jwt_filter["typed_config"]["rules"]
    required = [r["requires"]["provider_name"] for r in rules if "requires" in r]
    assert required and set(required) <= set(providers)
    assert rules[-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "tokensvc"}}
