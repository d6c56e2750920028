"""The transaction id joins traces and logs (docs/call-chains.md, "In traces, logs and the
audit trail"): on MintTransactionToken's server span, on the span of a protected call that
carries the Transaction Token, and in the handler's log records."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from opentelemetry.instrumentation.grpc import server_interceptor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tokensvc_client import (
    AuthInterceptor,
    JwksCache,
    TokenClient,
    TransactionLogFilter,
    channel,
    current_transaction,
)

log = logging.getLogger("tests.txn_tracing")


def test_the_transaction_id_is_on_the_spans_and_in_the_log(make_settings, start_server, caplog):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    service = start_server(make_settings(), tracer_provider=provider)
    tokens = TokenClient(service.target, insecure=True)
    user = tokens.issue("alice", roles=["r"], audience=["svc"])
    txn = tokens.mint_transaction_token(user.access_token, ["r"])

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        log.info("handling")
        return current_transaction().transaction_id.encode()

    server = grpc.server(
        futures.ThreadPoolExecutor(2),
        interceptors=[
            server_interceptor(tracer_provider=provider),  # before the auth interceptor
            AuthInterceptor(
                JwksCache(tokens.get_keys),
                issuer=service.settings.issuer,
                audience="svc",
                trust_domain=service.settings.trust_domain,
            ),
        ],
    )
    handlers = {"Get": grpc.unary_unary_rpc_method_handler(get)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Svc", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    records: list[logging.LogRecord] = []
    capture = logging.Handler()
    capture.emit = records.append  # type: ignore[method-assign]
    capture.addFilter(TransactionLogFilter())
    log.addHandler(capture)
    log.setLevel(logging.INFO)
    try:
        with channel(f"127.0.0.1:{port}", insecure=True) as chan:
            metadata = (
                ("authorization", f"Bearer {user.access_token}"),
                ("txn-token", txn.txn_token),
            )
            assert chan.unary_unary("/t.Svc/Get")(b"", metadata=metadata, timeout=10) == (
                txn.txn.encode()
            )
    finally:
        log.removeHandler(capture)
        server.stop(None)
        tokens.close()
    provider.force_flush()
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    minted = by_name["/tokensvc.v1.TokenService/MintTransactionToken"]
    assert minted.attributes["tokensvc.txn"] == txn.txn
    assert by_name["/t.Svc/Get"].attributes["tokensvc.txn"] == txn.txn
    assert [r.txn for r in records] == [txn.txn]  # type: ignore[attr-defined]
