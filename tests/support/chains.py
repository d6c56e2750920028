"""Call chains (docs/call-chains.md) in the tests: the development PKI plus an edge gateway,
and a policy where the gateway (edge) calls orders (A), which calls billing (B)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokensvc.cli.devcerts import DEFAULT_WORKLOADS, TRUST_DOMAIN, Issued, write_dev_pki
from tokensvc_client.verifier import b64url_decode

LOGIN = DEFAULT_WORKLOADS["login"]
GATEWAY = f"{TRUST_DOMAIN}/ns/edge/sa/gateway"
ORDERS = DEFAULT_WORKLOADS["orders"]
BILLING = DEFAULT_WORKLOADS["billing"]
#: the trust domain the tests run tokensvc with (--trust-domain)
DOMAIN = "tokensvc.test"
#: roles of the user's token the login service issues (audience "shop")
USER_ROLES = ["orders:read", "billing:read", "orders:write"]

POLICY = f"""
[rpc.Issue]
allow = ["{LOGIN}"]

[rpc.Revoke]
allow = ["{LOGIN}"]

[exchange."{GATEWAY}"]
subject_audiences = ["shop"]
audiences = ["orders"]

[exchange."{ORDERS}"]
subject_audiences = ["orders"]
audiences = ["billing"]
roles = ["orders:read", "billing:read"]

[exchange."{BILLING}"]
subject_audiences = ["billing"]
audiences = ["orders"]
impersonate = true

[transaction_tokens."{GATEWAY}"]
subject_audiences = ["shop"]
scopes = ["orders:read", "billing:read"]

[transaction_tokens."{ORDERS}"]
replace = true

[transaction_tokens."{BILLING}"]
own_scopes = ["reindex"]
"""


def write_chain_pki(directory: Path) -> dict[str, Issued]:
    """The development PKI with one more workload: ``gateway`` (the edge)."""
    return write_dev_pki(directory, workloads={**DEFAULT_WORKLOADS, "gateway": GATEWAY})


def header(token: str) -> dict[str, Any]:
    """A JWS's decoded header (no verification: the tests look at what was minted)."""
    return json.loads(b64url_decode(token.split(".")[0]))


def payload(token: str) -> dict[str, Any]:
    """A JWS's decoded claims (no verification)."""
    return json.loads(b64url_decode(token.split(".")[1]))
