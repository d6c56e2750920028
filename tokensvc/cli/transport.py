"""How every ``tokensvc`` command that calls a server connects: one set of flags, one rule.

The rule: **TLS always** (the server's CA from ``--ca``, else the system roots; mTLS with
``--cert``/``--key``), **plaintext only with** ``--insecure``, which is refused for anything
but a loopback target (the development mode of ``make run``). Flags fall back to
``TOKENSVC_TARGET``/``_CA``/``_CERT``/``_KEY``/``_INSECURE`` (``tokensvc health`` also reads
the ``TOKENSVC_HEALTH_*`` variables its container probes set).

A failed call is explained in one line, with a hint when the transports do not match (TLS
against a plaintext server, or the reverse). gRPC's own C-core log lines are kept out of
the output (``GRPC_VERBOSITY=NONE`` unless the user set it; see :func:`quiet_grpc`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from tokensvc.config import is_loopback
from tokensvc.config.env import env_flag
from tokensvc.errors import TokensvcError

DEFAULT_TARGET = "127.0.0.1:50051"


def quiet_grpc() -> None:
    """Silence gRPC C-core logging for CLI commands (must run before grpc is imported)."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def add_transport_args(
    cmd: argparse.ArgumentParser, *, env_prefixes: tuple[str, ...] = (), timeout: float = 10.0
) -> None:
    """``--target --ca --cert --key --insecure --timeout`` with defaults from the environment
    (variables named with ``env_prefixes`` first, then ``TOKENSVC_``)."""

    def env(name: str) -> str | None:
        for prefix in (*env_prefixes, "TOKENSVC_"):
            value = os.environ.get(prefix + name)
            if value:
                return value
        return None

    cmd.add_argument(
        "--target",
        default=env("TARGET") or DEFAULT_TARGET,
        help=f"server HOST:PORT [env TOKENSVC_TARGET; default {DEFAULT_TARGET}]",
    )
    cmd.add_argument(
        "--ca",
        default=env("CA"),
        help="CA certificate of the server (PEM) [env TOKENSVC_CA; default: system roots]",
    )
    cmd.add_argument(
        "--cert",
        default=env("CERT"),
        help="client certificate for mTLS (PEM) [env TOKENSVC_CERT; default: none]",
    )
    cmd.add_argument(
        "--key",
        default=env("KEY"),
        help="private key of --cert (PEM) [env TOKENSVC_KEY; default: none]",
    )
    cmd.add_argument(
        "--insecure",
        action="store_true",
        default=env_flag("TOKENSVC_INSECURE", env("INSECURE")),
        help="plaintext, loopback targets only (`make run`) [env TOKENSVC_INSECURE; default: TLS]",
    )
    cmd.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"seconds to wait for the answer [default {timeout:g}]",
    )


class TransportError(TokensvcError, ValueError):
    """The transport flags cannot work (e.g. --insecure to a remote target)."""

    code = "transport"


def open_channel(args: argparse.Namespace) -> Any:
    """A channel to ``args.target`` by the rule above.

    Raises:
        TransportError: --insecure with TLS material or a non-loopback target.
        OSError: a PEM file cannot be read.
        ValueError: only one of --cert and --key.
    """
    from tokensvc_client.channels import channel

    if args.insecure:
        if args.ca or args.cert or args.key:
            raise TransportError("--insecure (plaintext) and --ca/--cert/--key exclude each other")
        if not is_loopback(args.target.rsplit(":", 1)[0].strip("[]")):
            raise TransportError(f"--insecure is only for loopback targets, not {args.target}")
        return channel(args.target, insecure=True)
    return channel(args.target, ca=args.ca, cert=args.cert, key=args.key)


def explain(err: Any, args: argparse.Namespace) -> str:
    """One line for a failed call (a ``grpc.RpcError``), with a hint naming the fix when the
    transport looks wrong (see :func:`transport_hint`)."""
    from tokensvc_client.errors import from_rpc_error

    failed = from_rpc_error(err)
    if failed.code.name != "UNAVAILABLE":
        return f"{failed}"
    debug = str(getattr(err, "debug_error_string", lambda: "")())
    return f"{failed}{transport_hint(f'{failed} {debug}'.lower(), args)}"


#: What gRPC's error text says in each case (BoringSSL's names, lower-cased).
_UNTRUSTED = (
    "certificate_verify_failed",
    "unable to get local issuer",
    "self signed",
    "self-signed",
)
_EXPIRED = ("certificate has expired", "certificate is not yet valid")
_HANDSHAKE = ("ssl", "handshake", "wrong_version", "tls")
_CLOSED = ("socket closed", "connection reset", "end of file", "eof")


def transport_hint(text: str, args: argparse.Namespace) -> str:
    """The hint for an UNAVAILABLE whose (lower-cased) text is ``text``: each names the
    flag that fixes it. Order matters: an untrusted certificate also mentions "handshake"."""
    target = args.target
    if args.insecure:
        if any(word in text for word in _CLOSED):
            return (
                f" (hint: {target} closed the plaintext connection; if it serves TLS, "
                "drop --insecure and pass --ca)"
            )
    elif any(word in text for word in _EXPIRED):
        return (
            f" (hint: the server certificate of {target} has expired or is not valid yet; "
            "renew it on the server)"
        )
    elif any(word in text for word in _UNTRUSTED):
        if args.ca:
            return (
                f" (hint: the server certificate of {target} is not signed by --ca {args.ca}; "
                "pass the CA that signed it)"
            )
        return (
            f" (hint: the server certificate of {target} is not trusted by the system roots; "
            "pass --ca with the CA that signed it, e.g. .tokensvc/certs/ca.pem of `make certs`)"
        )
    elif any(word in text for word in _CLOSED):
        if not args.cert:
            return (
                f" (hint: {target} closed the TLS connection: it requires a client "
                "certificate (mTLS); pass --cert and --key)"
            )
        return (
            f" (hint: {target} closed the TLS connection: it did not accept --cert {args.cert} "
            "(not signed by its client CA?))"
        )
    elif any(word in text for word in _HANDSHAKE):
        return (
            f" (hint: the TLS handshake with {target} failed; if it is a plaintext "
            "development server (`make run`), pass --insecure)"
        )
    if "connect" in text:
        return f" (is tokensvc running on {target}?)"
    return ""


class CallFailed(Exception):
    """A command's call failed; ``exit_code`` is what the command returns (its one line is
    already on stderr)."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


def call_server(args: argparse.Namespace, call: Callable[[Any], Any]) -> Any:
    """Open the channel by the rule above, make ``call(stub)`` on a TokenService stub and
    return its reply. Every failure is one line on stderr, prefixed ``tokensvc RPC:``:
    bad transport flags, unreadable files or bad input (``ValueError``) exit 2, a failed
    call exits 1 with :func:`explain`'s hint.

    Raises:
        CallFailed: with the exit code, after printing the line.
    """
    import grpc

    from tokensvc.cli.output import printable
    from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc

    try:
        chan = open_channel(args)
    except (TransportError, ValueError, OSError) as err:
        print(f"tokensvc {args.rpc}: {printable(str(err))}", file=sys.stderr)
        raise CallFailed(2) from None
    with chan:
        try:
            return call(pb_grpc.TokenServiceStub(chan))
        except ValueError as err:
            print(f"tokensvc {args.rpc}: {printable(str(err))}", file=sys.stderr)
            raise CallFailed(2) from None
        except grpc.RpcError as err:
            print(f"tokensvc {args.rpc}: {printable(explain(err, args))}", file=sys.stderr)
            raise CallFailed(1) from None
