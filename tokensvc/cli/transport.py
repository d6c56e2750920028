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
from typing import Any

from tokensvc.config import is_loopback
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
        default=(env("INSECURE") or "").lower() in ("1", "true", "yes"),
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
    """One line for a failed call (a ``grpc.RpcError``), with a hint when the transport
    looks wrong."""
    from tokensvc_client.errors import from_rpc_error

    failed = from_rpc_error(err)
    debug = str(getattr(err, "debug_error_string", lambda: "")()).lower()
    text = f"{failed}".lower() + " " + debug
    hint = ""
    if failed.code.name == "UNAVAILABLE":
        if not args.insecure and any(
            word in text for word in ("ssl", "handshake", "wrong_version", "tls")
        ):
            hint = (
                f" (hint: the TLS handshake with {args.target} failed; if it is a plaintext "
                "development server (`make run`), pass --insecure)"
            )
        elif args.insecure and any(
            word in text for word in ("socket closed", "connection reset", "end of file", "eof")
        ):
            hint = (
                f" (hint: {args.target} closed the plaintext connection; if it serves TLS, "
                "drop --insecure and pass --ca)"
            )
        elif "connect" in text:
            hint = f" (is tokensvc running on {args.target}?)"
    return f"{failed}{hint}"
