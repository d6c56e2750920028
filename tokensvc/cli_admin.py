"""Admin commands that talk to a running service: ``keys``, ``sessions``, ``revoke``.

- ``tokensvc keys list|rotate [--now [--revoke-old]]|retire KID`` (ListKeys, RotateKeys,
  RetireKey); ``tokensvc keys rewrap`` talks to Redis directly, because it needs the
  key-encryption keys: it re-encrypts every private key under ``--kek-file``.
- ``tokensvc sessions list SUBJECT`` / ``sessions revoke SESSION_ID`` (ListSessions,
  Revoke by session).
- ``tokensvc revoke --subject S | --session-id SID | --token T`` (Revoke).

The RPC commands take ``--target/--ca/--cert/--key`` (or ``--insecure`` on loopback); the
caller policy applies, so use an admin identity's certificate. Output is JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tokensvc import config


def _connection_args(cmd: argparse.ArgumentParser) -> None:
    env = os.environ.get
    cmd.add_argument("--target", default=env("TOKENSVC_TARGET", "127.0.0.1:50051"))
    cmd.add_argument("--ca", default=env("TOKENSVC_CA"), help="server CA (PEM)")
    cmd.add_argument("--cert", default=env("TOKENSVC_CERT"), help="admin client certificate")
    cmd.add_argument("--key", default=env("TOKENSVC_KEY"), help="admin client key")
    cmd.add_argument("--insecure", action="store_true", help="plaintext (loopback dev mode)")
    cmd.add_argument("--timeout", type=float, default=10.0)


def add_commands(commands: Any) -> None:
    """Add ``keys``, ``sessions`` and ``revoke`` to the CLI's sub-parsers."""
    keys = commands.add_parser("keys", help="list, rotate, retire or re-wrap signing keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    for name, text in (
        ("list", "show the key ring"),
        ("rotate", "add a new key (pending, or active at once with --now)"),
        ("retire", "abandon a pending key"),
    ):
        cmd = sub.add_parser(name, help=text)
        _connection_args(cmd)
        cmd.set_defaults(run=_cmd_rpc, rpc=f"keys {name}")
        if name == "rotate":
            cmd.add_argument("--now", action="store_true", help="sign with the new key at once")
            cmd.add_argument(
                "--revoke-old",
                action="store_true",
                help="with --now: remove every older key from the JWK Set (compromised key)",
            )
        if name == "retire":
            cmd.add_argument("kid")
    env = os.environ.get
    rewrap = sub.add_parser("rewrap", help="re-encrypt every private key under --kek-file")
    rewrap.add_argument("--redis-url", default=env("TOKENSVC_REDIS_URL"), required=False)
    rewrap.add_argument("--kek-file", type=Path, default=env("TOKENSVC_KEK_FILE"))
    rewrap.add_argument("--previous-kek-file", type=Path, default=env("TOKENSVC_PREVIOUS_KEK_FILE"))
    rewrap.set_defaults(run=_cmd_rewrap)

    sessions = commands.add_parser("sessions", help="list or revoke a subject's sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = ssub.add_parser("list", help="a subject's sessions")
    listing.add_argument("subject")
    revoke_one = ssub.add_parser("revoke", help="revoke one session")
    revoke_one.add_argument("session_id")
    revoke_one.add_argument("--reason", default="")
    for cmd, rpc in ((listing, "sessions list"), (revoke_one, "sessions revoke")):
        _connection_args(cmd)
        cmd.set_defaults(run=_cmd_rpc, rpc=rpc)

    revoke = commands.add_parser("revoke", help="revoke a subject, a session or a token")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("--subject", help='every session of the subject ("log out everywhere")')
    target.add_argument("--session-id")
    target.add_argument("--token", help="an access or refresh token (careful: shell history)")
    revoke.add_argument("--reason", default="")
    _connection_args(revoke)
    revoke.set_defaults(run=_cmd_rpc, rpc="revoke")


def _call(stub: Any, args: argparse.Namespace) -> Any:
    from tokensvc_client.v1 import tokensvc_pb2 as pb

    rpc, timeout = args.rpc, args.timeout
    if rpc == "keys list":
        return stub.ListKeys(pb.ListKeysRequest(), timeout=timeout)
    if rpc == "keys rotate":
        rotate = pb.RotateKeysRequest(now=args.now, revoke_old=args.revoke_old)
        return stub.RotateKeys(rotate, timeout=timeout)
    if rpc == "keys retire":
        return stub.RetireKey(pb.RetireKeyRequest(kid=args.kid), timeout=timeout)
    if rpc == "sessions list":
        return stub.ListSessions(pb.ListSessionsRequest(subject=args.subject), timeout=timeout)
    if rpc == "sessions revoke":
        one = pb.RevokeRequest(session_id=args.session_id, reason=args.reason)
        return stub.Revoke(one, timeout=timeout)
    request = pb.RevokeRequest(reason=args.reason)
    if args.subject is not None:
        request.subject = args.subject
    elif args.session_id is not None:
        request.session_id = args.session_id
    else:
        request.token = args.token
    return stub.Revoke(request, timeout=timeout)


def _rows(reply: Any) -> list[dict[str, Any]]:
    """JSON-ready rows of a reply: its repeated messages, else the reply itself."""
    from google.protobuf.json_format import MessageToDict

    items = next(
        (getattr(reply, name) for name in ("keys", "sessions") if hasattr(reply, name)), [reply]
    )
    return [MessageToDict(item, always_print_fields_with_no_presence=True) for item in items]


def _cmd_rpc(args: argparse.Namespace) -> int:
    import grpc

    from tokensvc_client.channels import channel
    from tokensvc_client.errors import from_rpc_error
    from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

    try:
        chan = channel(
            args.target, ca=args.ca, cert=args.cert, key=args.key, insecure=args.insecure
        )
    except (ValueError, OSError) as err:
        print(f"tokensvc {args.rpc}: {err}", file=sys.stderr)
        return 2
    with chan:
        try:
            reply = _call(pb_grpc.TokenServiceStub(chan), args)
        except grpc.RpcError as err:
            print(f"tokensvc {args.rpc}: {from_rpc_error(err)}", file=sys.stderr)
            return 1
    for row in _rows(reply):
        print(json.dumps(row))
    return 0


def _cmd_rewrap(args: argparse.Namespace) -> int:
    from tokensvc.keyring import KeyRing, KeyRingError, load_kek
    from tokensvc.server import redis_client
    from tokensvc.store import StoreUnavailable

    if not args.redis_url or not args.kek_file:
        print("tokensvc keys rewrap: --redis-url and --kek-file are required", file=sys.stderr)
        return 2

    async def run() -> int:
        kek = load_kek(args.kek_file, Path("."))
        previous = [load_kek(args.previous_kek_file, Path("."))] if args.previous_kek_file else []
        client = redis_client(args.redis_url, 5.0)
        try:
            return await KeyRing(client, kek, previous).rewrap()
        finally:
            await client.aclose()

    try:
        if not args.redis_url.startswith(config.REDIS_SCHEMES):
            raise config.ConfigError(f"--redis-url must start with one of {config.REDIS_SCHEMES}")
        count = asyncio.run(run())
    except (config.ConfigError, KeyRingError, StoreUnavailable, OSError) as err:
        print(f"tokensvc keys rewrap: {err}", file=sys.stderr)
        return 2
    print(f"re-wrapped {count} key(s) under the key-encryption key {args.kek_file}")
    return 0
