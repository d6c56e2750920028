"""Admin commands that talk to a running service: ``keys``, ``sessions``, ``revoke``,
``lock``, ``unlock``.

- ``tokensvc keys list|rotate [--now [--revoke-old]]|retire KID`` (ListKeys, RotateKeys,
  RetireKey); ``tokensvc keys rewrap`` talks to Redis directly, because it needs the
  key-encryption keys: it re-encrypts every private key under ``--kek-file``.
- ``tokensvc sessions list SUBJECT`` / ``sessions revoke SESSION_ID`` (ListSessions,
  Revoke by session).
- ``tokensvc revoke --subject S | --session-id SID | --token T`` (Revoke).
- ``tokensvc lock SUBJECT [--reason R]`` / ``unlock SUBJECT`` (LockSubject, UnlockSubject).

The RPC commands take the transport flags of :mod:`tokensvc.cli.transport` (TLS, or
``--insecure`` on loopback); the caller policy applies, so use an admin identity's
certificate. Output follows :mod:`tokensvc.cli.output` (table, or ``--output json``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from tokensvc import config
from tokensvc.cli import local
from tokensvc.cli.output import add_output_arg, emit, row
from tokensvc.cli.transport import CallFailed, add_transport_args, call_server


def _rpc_command(commands: Any, name: str, text: str, rpc: str) -> argparse.ArgumentParser:
    cmd: argparse.ArgumentParser = commands.add_parser(name, help=text, description=text)
    add_transport_args(cmd)
    add_output_arg(cmd)
    cmd.set_defaults(run=_cmd_rpc, rpc=rpc)
    return cmd


def add_commands(commands: Any) -> None:
    """Add ``keys``, ``sessions``, ``revoke``, ``lock`` and ``unlock`` to the CLI."""
    keys = commands.add_parser("keys", help="list, rotate, retire or re-wrap signing keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    _rpc_command(sub, "list", "show the key ring", "keys list")
    rotate = _rpc_command(
        sub, "rotate", "add a new key (pending, or active at once with --now)", "keys rotate"
    )
    rotate.add_argument(
        "--now", action="store_true", help="sign with the new key at once [default: off]"
    )
    rotate.add_argument(
        "--revoke-old",
        action="store_true",
        help="with --now: remove every older key from the JWK Set (compromised key) [default: off]",
    )
    retire = _rpc_command(sub, "retire", "abandon a pending key", "keys retire")
    retire.add_argument(
        "kid",
        help="the pending key's id (see `tokensvc keys list`); one starting with '-' goes "
        "after --, as in `tokensvc keys retire [flags] -- -AbC...`",
    )
    env = os.environ.get
    rewrap = sub.add_parser(
        "rewrap",
        help="re-encrypt every private key under --kek-file",
        description="Re-encrypt every private key of the key ring under a new key-encryption "
        "key (--kek-file), decrypting with --previous-kek-file (or the development KEK of "
        "--data-dir). Talks to Redis directly: --redis-url, or the embedded Redis of "
        "--data-dir. Restart the servers with --kek-file NEW --previous-kek-file OLD first.",
    )
    local.add_redis_args(rewrap)
    rewrap.add_argument(
        "--kek-file",
        type=Path,
        default=env("TOKENSVC_KEK_FILE"),
        help="the new key-encryption key [env TOKENSVC_KEK_FILE; default: none, required]",
    )
    rewrap.add_argument(
        "--previous-kek-file",
        type=Path,
        default=env("TOKENSVC_PREVIOUS_KEK_FILE"),
        help="the KEK being replaced [env TOKENSVC_PREVIOUS_KEK_FILE; default: none]",
    )
    add_output_arg(rewrap)
    rewrap.set_defaults(run=_cmd_rewrap)

    sessions = commands.add_parser("sessions", help="list or revoke a subject's sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    listing = _rpc_command(ssub, "list", "a subject's sessions", "sessions list")
    listing.add_argument("subject")
    revoke_one = _rpc_command(ssub, "revoke", "revoke one session", "sessions revoke")
    revoke_one.add_argument("session_id")
    _reason(revoke_one)

    revoke = _rpc_command(commands, "revoke", "revoke a subject, a session or a token", "revoke")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--subject", help='every session of the subject ("log out everywhere") [default: none]'
    )
    target.add_argument("--session-id", help="one session [default: none]")
    target.add_argument(
        "--token", help="an access or refresh token (careful: shell history) [default: none]"
    )
    _reason(revoke)

    lock = _rpc_command(
        commands, "lock", "lock a subject: revoke its sessions, refuse Issue until unlocked", "lock"
    )
    lock.add_argument("subject")
    _reason(lock)
    unlock = _rpc_command(commands, "unlock", "let a locked subject log in again", "unlock")
    unlock.add_argument("subject")


def _reason(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--reason", default="", help="recorded in the audit trail [default: none]")


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
    if rpc == "lock":
        locking = pb.LockSubjectRequest(subject=args.subject, reason=args.reason)
        return stub.LockSubject(locking, timeout=timeout)
    if rpc == "unlock":
        return stub.UnlockSubject(pb.UnlockSubjectRequest(subject=args.subject), timeout=timeout)
    request = pb.RevokeRequest(reason=args.reason)
    if args.subject is not None:
        request.subject = args.subject
    elif args.session_id is not None:
        request.session_id = args.session_id
    else:
        request.token = args.token
    return stub.Revoke(request, timeout=timeout)


def _rows(reply: Any) -> list[dict[str, Any]]:
    """Output rows of a reply: its repeated messages, else the reply itself."""
    items = next(
        (getattr(reply, name) for name in ("keys", "sessions") if hasattr(reply, name)), [reply]
    )
    return [row(item) for item in items]


def _cmd_rpc(args: argparse.Namespace) -> int:
    try:
        reply = call_server(args, lambda stub: _call(stub, args))
    except CallFailed as failed:
        return failed.exit_code
    emit(_rows(reply), args.output, sys.stdout)
    return _say_what_was_revoked(args, reply)


def _say_what_was_revoked(args: argparse.Namespace, reply: Any) -> int:
    """For ``revoke`` and ``sessions revoke``: a line on stderr saying what was (not)
    revoked; exit 1 when a token or session matched nothing (a typo, an expired or foreign
    token), so scripts notice."""
    if args.rpc not in ("revoke", "sessions revoke"):
        return 0
    sessions, tokens = reply.revoked_sessions, reply.revoked_access_tokens
    if getattr(args, "subject", None) is not None:
        print(
            f"revoked {sessions} session(s) of {args.subject!r} and every access token "
            "issued to it so far",
            file=sys.stderr,
        )
        return 0
    if sessions or tokens:
        what = f"{sessions} session(s)" if sessions else "the access token (until it expires)"
        print(f"revoked {what}", file=sys.stderr)
        return 0
    print(
        "nothing revoked: no active session or valid token of this service matched",
        file=sys.stderr,
    )
    return 1


def _cmd_rewrap(args: argparse.Namespace) -> int:
    from tokensvc.keys.ring import KeyRing, KeyRingError, load_kek
    from tokensvc.redis.connection import redis_client
    from tokensvc.store import StoreUnavailable

    if not args.kek_file:
        print("tokensvc keys rewrap: --kek-file is required", file=sys.stderr)
        return 2
    try:
        url = local.redis_url(args)
    except RuntimeError as err:
        print(f"tokensvc keys rewrap: {err}", file=sys.stderr)
        return 2
    data_dir = local.data_dir(args)
    dev_kek = data_dir / "dev-kek.json"

    async def run() -> int:
        kek = load_kek(args.kek_file, data_dir)
        if args.previous_kek_file:
            previous = [load_kek(args.previous_kek_file, data_dir)]
        else:  # the development KEK the embedded set-up used, when there is one
            previous = [load_kek(None, data_dir)] if dev_kek.exists() else []
        client = redis_client(url, 5.0)
        try:
            return await KeyRing(client, kek, previous).rewrap()
        finally:
            await client.aclose()

    try:
        # progress on stderr, so `--output json` stays one object per line on stdout
        print(f"re-wrapping the key ring under {args.kek_file} ...", file=sys.stderr, flush=True)
        count = asyncio.run(run())
    except (config.ConfigError, KeyRingError, StoreUnavailable, OSError) as err:
        print(f"tokensvc keys rewrap: {err}", file=sys.stderr)
        return 2
    emit([{"rewrapped_keys": count, "kek_file": str(args.kek_file)}], args.output, sys.stdout)
    return 0
