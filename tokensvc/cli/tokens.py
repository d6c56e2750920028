"""Tokens from the shell: ``tokensvc issue``, ``refresh``, ``introspect`` and ``exchange``.

What the login service and the mesh's services do with a client library, a newcomer can do
from a terminal (grpcurl is not on a fresh machine): issue a pair for a subject, rotate it,
ask whether a token is active. The commands take the transport flags of
:mod:`tokensvc.cli.transport` and print a table, or with ``--output json`` one object per
line (:mod:`tokensvc.cli.output`), like every other command; a pair is printed one field a
line (tokens are too wide for columns).

A token given on the command line lands in the shell's history: ``refresh``,
``introspect`` and ``exchange`` read it from standard input when the argument is ``-`` or
left out (``tokensvc issue alice -o json | jq -r .refresh_token | tokensvc refresh``).
``exchange`` trades an access token for one to call another audience (RFC 8693,
docs/call-chains.md) as the workload of ``--cert``.
``introspect`` exits 0 for an active token and 1 for any other (scripts can test it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokensvc.cli.output import add_output_arg, emit_one, row
from tokensvc.cli.transport import CallFailed, add_transport_args, call_server


def _command(commands: Any, name: str, text: str) -> argparse.ArgumentParser:
    cmd: argparse.ArgumentParser = commands.add_parser(name, help=text, description=text)
    add_transport_args(cmd)
    add_output_arg(cmd)
    cmd.set_defaults(run=_run, rpc=name)
    return cmd


def add_commands(commands: Any) -> None:
    """Add ``issue``, ``refresh``, ``introspect`` and ``exchange`` to the CLI."""
    issue = _command(
        commands, "issue", "issue an access and refresh token pair for a subject (Issue)"
    )
    issue.add_argument("subject", help="who the tokens are for")
    issue.add_argument(
        "--role", action="append", dest="roles", default=[], help="a role (repeat) [default: none]"
    )
    issue.add_argument(
        "--audience",
        action="append",
        default=[],
        help="an audience of the access token (repeat) [default: the server's --audience]",
    )
    issue.add_argument("--client-id", default="", help="the client's id [default: none]")
    issue.add_argument(
        "--session-label",
        default="",
        help='shown in session listings, e.g. "laptop" [default: none]',
    )
    issue.add_argument(
        "--bind-to-client-certificate",
        action="store_true",
        help="bind the tokens to --cert (RFC 8705) [default: off]",
    )
    for name, what in (("refresh", "a refresh token"), ("introspect", "a token")):
        text = (
            "rotate a refresh token: prints the new pair (Refresh)"
            if name == "refresh"
            else "is a token active? prints its claims; exit 0 only when active (Introspect)"
        )
        cmd = _command(commands, name, text)
        cmd.add_argument(
            "token",
            nargs="?",
            default="-",
            help=f"{what}, or - to read it from standard input (keeps it out of the shell's "
            "history) [default: -]",
        )
    exchange = _command(
        commands,
        "exchange",
        "exchange an access token for one to call another audience, naming this workload "
        "(--cert) in its act claim (Exchange, RFC 8693)",
    )
    exchange.add_argument(
        "token",
        nargs="?",
        default="-",
        help="the access token received (subject token), or - to read it from standard "
        "input [default: -]",
    )
    exchange.add_argument(
        "--audience",
        action="append",
        default=[],
        required=True,
        help="the audience of the new token (repeat) [default: none; required]",
    )
    exchange.add_argument(
        "--role",
        action="append",
        dest="roles",
        default=[],
        help="a role of the new token, a subset of the subject token's (repeat) "
        "[default: all the policy lets pass]",
    )
    exchange.add_argument(
        "--impersonate",
        action="store_true",
        help="no act claim naming this workload (only where the policy allows) [default: off]",
    )


def _token(args: argparse.Namespace) -> str:
    """The token argument, or the first line of standard input for ``-``.

    Raises:
        ValueError: no token given.
    """
    token = str(args.token)
    if token == "-":
        token = sys.stdin.readline().strip()
    if not token:
        raise ValueError("no token given (argument or standard input)")
    return token


def _call(stub: Any, args: argparse.Namespace) -> Any:
    from tokensvc_client.v1 import tokensvc_pb2 as pb

    if args.rpc == "issue":
        request = pb.IssueRequest(
            subject=args.subject,
            roles=args.roles,
            audience=args.audience,
            client_id=args.client_id,
            session_label=args.session_label,
            bind_to_client_certificate=args.bind_to_client_certificate,
        )
        return stub.Issue(request, timeout=args.timeout).tokens
    if args.rpc == "refresh":
        refresh = pb.RefreshRequest(refresh_token=_token(args))
        return stub.Refresh(refresh, timeout=args.timeout).tokens
    if args.rpc == "exchange":
        exchange = pb.ExchangeRequest(
            subject_token=_token(args),
            audience=args.audience,
            roles=args.roles,
            impersonate=args.impersonate,
        )
        return stub.Exchange(exchange, timeout=args.timeout)
    return stub.Introspect(pb.IntrospectRequest(token=_token(args)), timeout=args.timeout)


def _run(args: argparse.Namespace) -> int:
    try:
        reply = call_server(args, lambda stub: _call(stub, args))
    except CallFailed as failed:
        return failed.exit_code
    emit_one(row(reply), args.output, sys.stdout)
    if args.rpc == "introspect" and not reply.active:
        return 1
    return 0
