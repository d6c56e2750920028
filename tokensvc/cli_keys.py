"""``tokensvc keys``: the signing key ring from the command line.

``list``, ``rotate [--now [--revoke-old]]`` and ``retire KID`` call the admin RPCs of a
running service (so the caller policy applies: use an admin identity's certificate);
``rewrap`` talks to Redis directly, because it needs the key-encryption keys: it
re-encrypts every private key under ``--kek-file`` (decrypting with
``--previous-kek-file``). See README "Key rotation runbook".
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


def add_commands(commands: Any) -> None:
    """Add ``keys ...`` to the CLI's sub-parsers."""
    keys = commands.add_parser("keys", help="list, rotate, retire or re-wrap signing keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    env = os.environ.get
    for name, text in (
        ("list", "show the key ring"),
        ("rotate", "add a new key (pending, or active at once with --now)"),
        ("retire", "abandon a pending key"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--target", default=env("TOKENSVC_TARGET", "127.0.0.1:50051"))
        cmd.add_argument("--ca", default=env("TOKENSVC_CA"), help="server CA (PEM)")
        cmd.add_argument("--cert", default=env("TOKENSVC_CERT"), help="admin client cert")
        cmd.add_argument("--key", default=env("TOKENSVC_KEY"), help="admin client key")
        cmd.add_argument("--insecure", action="store_true", help="plaintext (loopback dev)")
        cmd.add_argument("--timeout", type=float, default=10.0)
        cmd.set_defaults(run=_cmd_rpc)
        if name == "rotate":
            cmd.add_argument("--now", action="store_true", help="sign with the new key at once")
            cmd.add_argument(
                "--revoke-old",
                action="store_true",
                help="with --now: remove every older key from the JWK Set (compromised key)",
            )
        if name == "retire":
            cmd.add_argument("kid")
    rewrap = sub.add_parser("rewrap", help="re-encrypt every private key under --kek-file")
    rewrap.add_argument("--redis-url", default=env("TOKENSVC_REDIS_URL"), required=False)
    rewrap.add_argument("--kek-file", type=Path, default=env("TOKENSVC_KEK_FILE"))
    rewrap.add_argument("--previous-kek-file", type=Path, default=env("TOKENSVC_PREVIOUS_KEK_FILE"))
    rewrap.set_defaults(run=_cmd_rewrap)


def _cmd_rpc(args: argparse.Namespace) -> int:
    import grpc

    from tokensvc_client import RpcFailed
    from tokensvc_client.channels import channel
    from tokensvc_client.errors import from_rpc_error
    from tokensvc_client.v1 import tokensvc_pb2 as pb
    from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

    try:
        chan = channel(
            args.target, ca=args.ca, cert=args.cert, key=args.key, insecure=args.insecure
        )
    except (ValueError, OSError) as err:
        print(f"tokensvc keys: {err}", file=sys.stderr)
        return 2
    with chan:
        stub = pb_grpc.TokenServiceStub(chan)
        try:
            if args.keys_command == "list":
                reply: Any = stub.ListKeys(pb.ListKeysRequest(), timeout=args.timeout)
            elif args.keys_command == "rotate":
                request = pb.RotateKeysRequest(now=args.now, revoke_old=args.revoke_old)
                reply = stub.RotateKeys(request, timeout=args.timeout)
            else:
                reply = stub.RetireKey(pb.RetireKeyRequest(kid=args.kid), timeout=args.timeout)
        except grpc.RpcError as err:
            failed: RpcFailed = from_rpc_error(err)
            print(f"tokensvc keys: {failed}", file=sys.stderr)
            return 1
    for key in reply.keys:
        row = {"kid": key.kid, "state": key.state}
        for name in ("created_at", "activated_at", "retired_at", "activate_after", "delete_after"):
            if key.HasField(name):
                row[name] = getattr(key, name).ToJsonString()
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
