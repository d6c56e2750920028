"""Rows rpc.exchange and rpc.mint_txn_token (docs/call-chains.md: Exchange and
MintTransactionToken under the standard load, with the server's CPU per request, against
Issue's), and interceptor.warm_txn (µs per decision of a call carrying an access token and
a Transaction Token, both cached: against the access-token interceptor's target)."""

from __future__ import annotations

import time

from bench.interceptor_rows import METHOD
from bench.run import AUDIENCE, ISSUER, Bench, Target
from tokensvc_client import KeySet, TokenClient
from tokensvc_client._auth import Authenticator
from tokensvc_client._chains import TransactionTokens
from tokensvc_client.context import Verified
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Verifier

#: rows measured against a server process (they carry its CPU per request)
SERVER_ROWS = ("rpc.exchange", "rpc.mint_txn_token")
ROWS = (*SERVER_ROWS, "interceptor.warm_txn")
#: tokensvc serve's default --trust-domain (the bench does not set one)
TRUST_DOMAIN = "tokensvc.local"
TARGETS = [
    # no worse than Issue: one Redis round trip (the subject token's state) and a signature
    Target("rpc.exchange", "rpc.issue", at_least=1.0),
    Target("rpc.exchange", "rpc.issue", "server_cpu_us", at_most=1.0),
    Target("rpc.mint_txn_token", "rpc.issue", at_least=1.0),
    Target("rpc.mint_txn_token", "rpc.issue", "server_cpu_us", at_most=1.0),
    # two cached tokens per call, within the access-token interceptor's own target
    Target("interceptor.warm_txn", "", "us_per_op", at_most=10),
]


def _decide(auth: Authenticator, metadata: tuple[tuple[str, str], ...], keys: KeySet) -> None:
    decision = auth.decide_call(METHOD, metadata)
    next(decision)
    try:
        decision.send(keys)
    except StopIteration as done:
        if not isinstance(done.value, Verified) or done.value.transaction is None:
            raise RuntimeError(f"bench tokens rejected: {done.value}") from None
        return
    raise RuntimeError("decision wanted more keys")


def run(b: Bench) -> None:
    n = b.n(4000)
    with b.serve() as server:
        client = TokenClient(server.target, insecure=True)
        user = client.issue("bench-user", roles=["reader", "writer"], audience=["shop", AUDIENCE])
        exchange = pb.ExchangeRequest(
            subject_token=user.access_token, audience=["orders"], roles=["reader"]
        ).SerializeToString()
        b.measure("rpc.exchange", server, "Exchange", [exchange] * n)
        mint = pb.MintTransactionTokenRequest(
            subject_token=user.access_token,
            scope=["reader"],
            request_details='{"order":"42"}',
            request_context='{"req_ip":"203.0.113.7"}',
        ).SerializeToString()
        b.measure("rpc.mint_txn_token", server, "MintTransactionToken", [mint] * n)

        b.progress("interceptor.warm_txn")
        txn = client.mint_transaction_token(user.access_token, ["reader"]).txn_token
        keys = client.get_keys().key_set()
        auth = Authenticator(
            Verifier(ISSUER, AUDIENCE),
            transactions=TransactionTokens.of(
                TRUST_DOMAIN, (), issuer=ISSUER, leeway=30, clock=time.time
            ),
        )
        metadata = (("authorization", f"Bearer {user.access_token}"), ("txn-token", txn))
        b.record_op("interceptor.warm_txn", lambda: _decide(auth, metadata, keys), b.n(20000))
        client.close()
