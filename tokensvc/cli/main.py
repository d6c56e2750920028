"""``tokensvc`` command line: ``serve`` runs the service, ``health`` probes one,
``audit tail`` prints the audit trail, ``certs`` writes a development PKI; ``keys``,
``sessions``, ``revoke``, ``lock`` and ``unlock`` administer a running service
(:mod:`tokensvc.cli.admin`).

Every command that calls a server takes the same transport flags (:mod:`tokensvc.cli.transport`:
TLS, or ``--insecure`` on loopback) and every command prints a table, or with
``--output json`` one JSON object per line (:mod:`tokensvc.cli.output`).

Every ``serve`` flag is also a ``TOKENSVC_*`` environment variable; ``tokensvc serve --help``
lists them. A bad value ends the program at start-up with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from tokensvc import config
from tokensvc.cli import admin, local, tokens
from tokensvc.cli.output import add_output_arg, emit, printable
from tokensvc.cli.transport import (
    TransportError,
    add_transport_args,
    explain,
    open_channel,
    quiet_grpc,
)
from tokensvc.config import env as config_env
from tokensvc.config import flags as config_flags

log = logging.getLogger("tokensvc.cli")


def _cmd_serve(args: argparse.Namespace) -> int:
    # imported here: `tokensvc health` stays light
    from tokensvc.keys.ring import KeyRingError
    from tokensvc.observe.logs import setup_logging
    from tokensvc.proc.ownership import claim_address
    from tokensvc.runtime import server, workers
    from tokensvc.store import StoreUnavailable

    settings = config_env.load(args)
    setup_logging(settings.log_level)
    for name in config_env.unknown_variables(os.environ):
        log.warning("ignoring unknown environment variable %s (see tokensvc serve --help)", name)
    try:
        claim = claim_address(settings.listen)  # held (open) while serving
        try:
            if settings.workers > 1:
                return workers.serve_workers(settings)
            server.run(settings)
        finally:
            if claim is not None:
                claim.close()
    except (KeyRingError, StoreUnavailable, RuntimeError, OSError) as err:
        # start-up failures (bad KEK, unreachable Redis, port in use, unreadable
        # certificate) are one line; StartupError is a RuntimeError
        print(f"tokensvc: cannot start: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    """Prints the serving status (SERVING, NOT_SERVING, ...); exit 0 only for SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        channel = open_channel(args)
    except (TransportError, ValueError, OSError) as err:
        print(f"tokensvc health: {err}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"unhealthy: {printable(explain(err, args))}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.output == "json":
        emit([{"status": status}], "json", sys.stdout)
    else:
        print(status)  # one word: probes grep for it
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


#: Audit fields that are text even when they look like a number (a subject "42").
_TEXT_FIELDS = frozenset(
    {"id", "event", "subject", "peer", "session_id", "jti", "reason", "client_id", "target",
     "kid", "trace_id", "rpc", "identity", "txn"}
)  # fmt: skip


def _typed(entry: dict[str, object]) -> dict[str, object]:
    """An audit entry as the CLI's JSON convention has it: ``ts`` in epoch seconds (the
    stream keeps milliseconds), counts as numbers, yes/no values as booleans."""
    out: dict[str, object] = {}
    for key, value in entry.items():
        if key == "ts" and isinstance(value, int):
            value = value / 1000
        elif key not in _TEXT_FIELDS and isinstance(value, str):
            if value.lstrip("-").isdigit() and len(value) < 19:
                value = int(value)
            elif value in ("true", "false"):
                value = value == "true"
        out[key] = value
    return out


class _AuditTable:
    """Audit entries as table rows as they arrive; a live count on a terminal's stderr."""

    COLUMNS = ("time", "event", "subject", "session_id", "peer")

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.count = 0
        self.live = sys.stderr.isatty()

    def write(self, line: str) -> None:
        self.count += 1
        if self.fmt == "json":
            print(json.dumps(_typed(json.loads(line))), flush=True)
        else:
            entry = json.loads(line)
            if self.count == 1:
                print(f"{'TIME':20}  {'EVENT':15}  {'SUBJECT':20}  {'SESSION_ID':18}  PEER")
            ts = entry.get("ts")
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts / 1000)) if ts else "-"
            # every field may hold what a caller chose (a common name, a subject): escaped
            sid = printable(str(entry.get("session_id", "-")))
            sid = sid if len(sid) <= 18 else sid[:17] + "…"
            event, subject, peer = (
                printable(str(entry.get(key, "-"))) for key in ("event", "subject", "peer")
            )
            rest = " ".join(
                f"{printable(str(k))}={printable(str(v))}"
                for k, v in entry.items()
                if k not in (*self.COLUMNS, "ts", "id")
            )
            print(
                f"{when:20}  {event:15}  {subject:20}  {sid:18}  {peer} {rest}".rstrip(),
                flush=True,
            )
        if self.live:
            print(f"\r{self.count} entries", end="", file=sys.stderr, flush=True)


def _cmd_audit_tail(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from tokensvc.observe import audit_tail
    from tokensvc.redis.connection import redis_client
    from tokensvc.store import StoreUnavailable

    try:
        url = local.redis_url(args)
    except RuntimeError as err:
        print(f"tokensvc: cannot read the audit trail: {err}", file=sys.stderr)
        return 2

    table = _AuditTable(args.output)

    async def run() -> None:
        # Ctrl-C ends --follow at the next XREAD block (1 s): a flag, not a cancellation
        # that a Redis read in flight could swallow
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        # socket timeout above the XREAD BLOCK of --follow
        client = redis_client(url, 10.0)
        try:
            await audit_tail.tail(
                client,
                count=args.count,
                follow=args.follow,
                write=table.write,
                security=args.security,
                stop=stop,
            )
        finally:
            await client.aclose()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # Ctrl-C ends --follow: not an error
        return 0
    except BrokenPipeError:  # `tokensvc audit tail | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (StoreUnavailable, RedisError, OSError) as err:
        # the cause names the host or socket ("Error 111 connecting to ..."), not the URL
        # (which may carry a password)
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        print(f"tokensvc: cannot read the audit trail: {err}{cause}", file=sys.stderr)
        return 2
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from tokensvc.cli import devcerts

    directory = Path(args.directory).expanduser()
    hosts = tuple(args.hosts) if args.hosts else ("localhost", "127.0.0.1", "::1")
    if (directory / "ca.pem").exists() and not args.force:
        # a new CA would make every server and client of the working set-up distrust the
        # others: replacing it is a decision, not a side effect of running `make certs` twice
        print(
            f"tokensvc: {directory} already holds a CA (ca.pem); keeping it. Pass --force to "
            "replace the whole PKI (servers and clients using the old one stop trusting it)",
            file=sys.stderr,
        )
        return 2
    try:
        issued = devcerts.write_dev_pki(directory, hosts=hosts)
    except (OSError, ValueError) as err:
        print(f"tokensvc: cannot write certificates: {err}", file=sys.stderr)
        return 2
    emit(devcerts.files_written(issued), args.output, sys.stdout)
    if args.output == "json":  # scripts get the files; the hints below are for people
        return 0
    server = issued["server"]

    def q(path: Path) -> str:
        return shlex.quote(str(path))

    print(f"\na development PKI for 30 days, never for production, in {directory}")
    loopback = all(host in ("localhost", "127.0.0.1", "::1") for host in hosts)
    listen = "127.0.0.1:50051" if loopback else "0.0.0.0:50051"
    print("serve with mTLS (client certificates signed by the CA):")
    print(
        f"  tokensvc serve --listen {listen} --tls-cert {q(server.cert)} "
        f"--tls-key {q(server.key)} --tls-client-ca {q(server.ca)}"
    )
    admin = issued.get("admin")
    if admin is not None:
        target = f"[{hosts[0]}]" if ":" in hosts[0] else hosts[0]
        print("probe it:")
        print(
            f"  tokensvc health --target {target}:50051 --ca {q(server.ca)} "
            f"--cert {q(admin.cert)} --key {q(admin.key)}"
        )
    return 0


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {raw!r}")
    return value


def _version() -> str:
    try:
        return metadata.version("tokensvc")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensvc", description="tokensvc token service")
    parser.add_argument("--version", action="version", version=f"tokensvc {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the token service")
    config_flags.add_arguments(serve)
    serve.set_defaults(run=_cmd_serve)
    health = commands.add_parser(
        "health",
        help="query a server's gRPC health service",
        description="query a server's gRPC health service (TOKENSVC_HEALTH_* variables, as "
        "the container probes set them, come before TOKENSVC_*)",
    )
    add_transport_args(health, env_prefixes=("TOKENSVC_HEALTH_",), timeout=3.0)
    health.add_argument(
        "--service", default="", help="service name to check [default: the whole server]"
    )
    add_output_arg(health)
    health.set_defaults(run=_cmd_health)

    audit = commands.add_parser("audit", help="read the audit trail (Redis stream ts:audit)")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    tail = audit_commands.add_parser(
        "tail",
        help="print the latest audit entries (Ctrl-C ends --follow)",
        description="Print the latest entries of the audit trail, oldest first, as a table or "
        "with -o json one object per line (ts in epoch seconds). Reads Redis directly: "
        "--redis-url, or the embedded Redis of --data-dir (what `make run` uses).",
    )
    local.add_redis_args(tail)
    tail.add_argument(
        "-n", "--count", type=_count, default=20, help="entries to print first [default 20]"
    )
    tail.add_argument(
        "--security",
        action="store_true",
        help="only security events (reuse, revocations, locks, key changes), from "
        "ts:audit:security, which refused calls cannot crowd out [default: every event]",
    )
    tail.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new entries as they come [default: off]",
    )
    add_output_arg(tail)
    tail.set_defaults(run=_cmd_audit_tail)

    certs = commands.add_parser(
        "certs", help="write a development PKI: CA, server and workload client certificates"
    )
    certs.add_argument("directory", help="where to write the PEM files (created if missing)")
    certs.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA and every certificate [default: refuse]",
    )
    certs.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="server certificate DNS name or IP (repeat for several) "
        "[default localhost, 127.0.0.1, ::1]",
    )
    add_output_arg(certs)
    certs.set_defaults(run=_cmd_certs)
    tokens.add_commands(commands)
    admin.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # the parser reads TOKENSVC_* defaults (a bad boolean is a configuration error)
        args = build_parser().parse_args(argv)
        if args.command != "serve":
            quiet_grpc()  # gRPC's own log lines are not the command's output
        return int(args.run(args))
    except config.ConfigError as err:
        print(f"tokensvc: configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
