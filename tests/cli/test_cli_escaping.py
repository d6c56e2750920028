"""Operator views escape what callers control: with ``--allow-cn-identities`` a common
name holding a newline, an ANSI escape or U+202E must neither forge a line nor rewrite the
terminal in `tokensvc audit tail`'s table, nor in any other table (one function,
``tokensvc.cli.output.printable``, for every cell). JSON output escapes by itself.

A real tokensvc over mTLS with a certificate whose common name is hostile; the audit
trail read back with the real CLI.
"""

from __future__ import annotations

import io
import json
import time

import grpc
import pytest
import redis

from tokensvc.cli import main as cli
from tokensvc.cli.devcerts import DevCA
from tokensvc.cli.output import emit, printable
from tokensvc.observe.audit_writer import AUDIT_STREAM
from tokensvc_client.channels import channel
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

#: a forged audit row after a newline, a screen clear, a title change, a bidi override
HOSTILE_CN = "x\n2099-01-01 issued root-admin\x1b[2J\x1b]0;t\x07\u202eevil\x85"
RAW = ("\n", "\x1b", "\x07", "\u202e", "\x85")


def _clean(text: str) -> None:
    for char in RAW:
        assert char not in text, repr(char)


def test_audit_tail_escapes_a_hostile_common_name(
    make_settings, start_server, redis_url, tmp_path, capsys
):
    ca = DevCA(tmp_path / "pki")
    server = ca.issue("server", hosts=("127.0.0.1",), server=True)
    hostile = ca.issue("hostile", common_name=HOSTILE_CN)
    policy = tmp_path / "policy.toml"
    policy.write_text('[rpc.Issue]\nallow = ["cn:someone-else"]\n')
    srv = start_server(
        make_settings(
            insecure=False,
            tls_cert=server.cert,
            tls_key=server.key,
            tls_client_ca=ca.ca_path,
            policy_file=policy,
            allow_cn_identities=True,
        )
    )
    target = f"127.0.0.1:{srv.port}"
    with channel(target, ca=ca.ca_path, cert=hostile.cert, key=hostile.key) as chan:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.TokenServiceStub(chan).Issue(pb.IssueRequest(subject="alice"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 10
    while not any(f["event"] == "denied" for _id, f in client.xrange(AUDIT_STREAM)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    entries = [f for _id, f in client.xrange(AUDIT_STREAM)]
    assert any(f.get("peer") == "cn:" + HOSTILE_CN for f in entries)  # stored as it came

    assert cli.main(["audit", "tail", "--redis-url", redis_url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()  # (splits at U+0085 and U+2028 too)
    assert len(lines) == 1 + len(entries)  # a header and one row each: nothing forged
    _clean(out.replace("\n", ""))
    assert any(printable("cn:" + HOSTILE_CN) in line for line in lines)
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\n2099" in out

    # JSON keeps the value exact (and escaped by JSON itself)
    assert cli.main(["audit", "tail", "--redis-url", redis_url, "-o", "json"]) == 0
    out = capsys.readouterr().out
    assert all(char not in out for char in RAW[1:])
    peers = [json.loads(line).get("peer") for line in out.splitlines()]
    assert "cn:" + HOSTILE_CN in peers


def test_every_table_cell_is_escaped():
    out = io.StringIO()
    rows = [
        {"session_label": "phone\x1b[31m\u202e", "scopes": ["a\nb", "c"], "active": True},
        {"session_label": "plain é 名", "scopes": [], "active": False},
    ]
    emit(rows, "table", out)
    text = out.getvalue()
    assert text.count("\n") == 3
    _clean(text.replace("\n", ""))
    assert "phone\\x1b[31m\\u202e" in text and "a\\nb,c" in text
    assert "plain é 名" in text  # printable text stays as it is


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("tab\there", "tab\\there"),
        ("back\\slash", "back\\\\slash"),  # so that an escape is never ambiguous
        ("del\x7f", "del\\x7f"),
        ("c1\x9b", "c1\\x9b"),
        ("zw\u200bj\u2066", "zw\\u200bj\\u2066"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("tag\U000e0041", "tag\\U000e0041"),
        ("nbsp\u00a0ok", "nbsp\u00a0ok"),
    ],
)
def test_printable(raw, shown):
    assert printable(raw) == shown
