"""``/metrics`` is served only where the operator put it: with ``--metrics-listen`` set, the
public JWKS port (``--http-listen``) answers 404 for it, even with one worker; without it,
one worker serves it on the JWKS port."""

from __future__ import annotations

import http.client

import pytest

from tokensvc.observe import metrics


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.mark.parametrize("metrics_listen", ["127.0.0.1:0", None])
def test_metrics_only_where_the_operator_put_them(make_settings, start_server, metrics_listen):
    srv = start_server(
        make_settings(http_listen="127.0.0.1:0", metrics_listen=metrics_listen, workers=1)
    )
    assert srv.running.http is not None
    public = srv.running.http.port
    assert _get(public, "/.well-known/jwks.json")[0] == 200
    status, body = _get(public, metrics.METRICS_PATH)
    if metrics_listen is None:
        assert status == 200 and b"tokensvc_keys" in body
    else:
        assert status == 404
        assert srv.running.metrics_http is not None
        status, body = _get(srv.running.metrics_http.port, metrics.METRICS_PATH)
        assert status == 200 and b"tokensvc_keys" in body
