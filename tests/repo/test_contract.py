"""The contract outside Python: `buf breaking` (run by `make check-contract`) rejects a change
that would break existing callers and accepts an additive one, and the Envoy configuration
of docs/operations.md is valid for Envoy's API and fetches the JWKS from where tokensvc
serves it.

buf comes from .ci/tools.d/buf.sh (`make tools`); the checks run it on a copy of protos/ so
the committed contract is never touched.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
import yaml

from tokensvc.config import Settings
from tokensvc.http.listener import JWKS_PATH

with warnings.catch_warnings():  # its generated classes use an idiom pydantic 2.12 deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.config.cluster.v3 import Cluster
    from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import JwtAuthentication
    from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
    from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import UpstreamTlsContext

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools/buf/node_modules/.bin/buf"
PROTO = Path("protos/tokensvc_client/v1/tokensvc.proto")
BASELINE = "protos/released/tokensvc-v1.binpb"
T = TypeVar("T")


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
            "message RevokeResponse {\n  int64 revoked_sessions = 1;",
            "message RevokeResponse {\n  int32 revoked_sessions = 1;",
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


# -- the Envoy example of docs/operations.md --------------------------------------------
# Read with Envoy's own API definitions (envoy-data-plane): an unknown or misplaced field
# fails here as it would fail Envoy's config load. Envoy itself is not packaged for Debian.


def _typed(config: dict[str, Any], message: type[T]) -> T:
    """``config["typed_config"]`` as ``message`` after checking its ``@type`` names it."""
    typed = dict(config["typed_config"])
    assert (
        typed.pop("@type")
        == f"type.googleapis.com/{message.__module__.split('.', 1)[1]}.{message.__name__}"
    )
    return message.from_dict(typed)


def _envoy_config() -> tuple[JwtAuthentication, Cluster, UpstreamTlsContext]:
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs/operations.md").read_text(), re.S)
    (block,) = [b for b in blocks if "envoy.filters.http.jwt_authn" in b]
    config = yaml.safe_load(block)
    jwt_filter, router = config["http_filters"]
    assert jwt_filter["name"] == "envoy.filters.http.jwt_authn"
    assert router["name"] == "envoy.filters.http.router"  # the router comes last
    _typed(router, Router)
    (cluster,) = config["clusters"]
    raw = dict(cluster)
    socket = raw.pop("transport_socket")
    assert socket["name"] == "envoy.transport_sockets.tls"
    return (
        _typed(jwt_filter, JwtAuthentication),
        Cluster.from_dict(raw),
        _typed(socket, UpstreamTlsContext),
    )


def _deployed_http_port() -> int:
    env = (ROOT / "deploy/kubernetes/config.env").read_text()
    (listen,) = re.findall(r"^TOKENSVC_HTTP_LISTEN=(.+)$", env, re.M)
    return int(listen.rsplit(":", 1)[1])


def test_readme_envoy_example_fetches_the_jwks_from_the_https_listener() -> None:
    jwt_authn, cluster, tls = _envoy_config()
    provider = jwt_authn.providers["tokensvc"]
    jwks = provider.remote_jwks
    uri = urlsplit(jwks.http_uri.uri)
    assert uri.scheme == "https"  # the listener is HTTPS with the service's certificate
    assert uri.path == JWKS_PATH
    assert uri.port == _deployed_http_port()
    assert uri.hostname == urlsplit(provider.issuer).hostname
    # never cached longer than tokensvc publishes a key before signing with it
    (max_age,) = [f.default for f in dataclasses.fields(Settings) if f.name == "jwks_max_age"]
    assert jwks.cache_duration == timedelta(seconds=max_age)
    assert provider.forward  # the service's interceptor needs the token too

    assert jwks.http_uri.cluster == cluster.name == cluster.load_assignment.cluster_name
    (endpoint,) = cluster.load_assignment.endpoints[0].lb_endpoints
    address = endpoint.endpoint.address.socket_address
    assert (address.address, address.port_value) == (uri.hostname, uri.port)
    assert tls.sni == uri.hostname
    validation = tls.common_tls_context.validation_context
    assert validation.trusted_ca.filename
    assert [m.matcher.exact for m in validation.match_typed_subject_alt_names] == [uri.hostname]

    health, everything = jwt_authn.rules
    assert health.match.prefix == "/grpc.health.v1.Health/" and health.requires is None
    assert everything.match.prefix == "/"
    assert everything.requires.provider_name == "tokensvc"


def test_envoy_schema_rejects_a_misspelt_field() -> None:
    """The check above can fail: the classes refuse what Envoy would refuse."""
    with pytest.raises(KeyError, match="cache_duraton"):
        JwtAuthentication.from_dict({"providers": {"p": {"remote_jwks": {"cache_duraton": "1s"}}}})
