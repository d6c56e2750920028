"""One CLI: the same transport flags and rule for every command that calls a server, a
hint when TLS meets plaintext, one output convention, help texts with defaults."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tokensvc.cli import main as cli
from tokensvc_client.v1 import tokensvc_pb2 as pb

SERVER_COMMANDS = (
    ["health"],
    ["keys", "list"],
    ["keys", "rotate"],
    ["keys", "retire", "KID"],
    ["sessions", "list", "alice"],
    ["sessions", "revoke", "SID"],
    ["revoke", "--subject", "alice"],
    ["lock", "alice"],
    ["unlock", "alice"],
)


def _parsers(parser: argparse.ArgumentParser, path: str = "tokensvc"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_says_its_default():
    missing = [
        f"{path} {action.option_strings[-1]}"
        for path, parser in _parsers(cli.build_parser())
        for action in parser._actions
        if action.option_strings
        and action.help != argparse.SUPPRESS
        and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        and "default" not in (action.help or "")
    ]
    assert missing == []


def test_every_server_command_has_the_same_transport_flags():
    parser = cli.build_parser()
    for argv in SERVER_COMMANDS:
        args = parser.parse_args(argv)
        assert (args.target, args.ca, args.cert, args.key, args.insecure) == (
            "127.0.0.1:50051",
            None,
            None,
            None,
            False,
        ), argv


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("tokensvc ")


def test_health_on_a_plaintext_server(tokensvc, capsys):
    assert cli.main(["health", "--insecure", "--target", tokensvc.target]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert cli.main(["health", "--insecure", "--target", tokensvc.target, "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "SERVING"}


def test_tls_against_plaintext_explains_itself_without_grpc_log_lines(tokensvc):
    """A subprocess, so gRPC's C-core logging (stderr) is what a user would see."""
    done = subprocess.run(
        [sys.executable, "-m", "tokensvc", "keys", "list", "--target", tokensvc.target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "UNAVAILABLE" in lines[0] and "pass --insecure" in lines[0]


def test_a_missing_ca_file_is_one_line_exit_2(capsys):
    assert cli.main(["health", "--ca", "/missing.pem"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/missing.pem" in err


def test_insecure_is_for_loopback_only(capsys):
    assert cli.main(["health", "--insecure", "--target", "tokensvc.example:50051"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_json_output_is_snake_case_with_numbers(tokensvc, capsys):
    pair = tokensvc.stub().Issue(pb.IssueRequest(subject="alice")).tokens
    argv = ["sessions", "list", "alice", "--insecure", "--target", tokensvc.target]
    assert cli.main([*argv, "--output", "json"]) == 0
    (session,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert session["session_id"] == pair.session_id
    assert isinstance(session["created_at"], int) and isinstance(session["expires_at"], int)
    assert session["active"] is True
    assert cli.main(argv) == 0  # the table: a header and one row
    header, line = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["SESSION_ID", "CLIENT_ID"]
    assert line.startswith(pair.session_id)
