"""``tokensvc`` command line: ``serve`` runs the service, ``health`` probes one.

Every ``serve`` flag is also a ``TOKENSVC_*`` environment variable; ``tokensvc serve --help``
lists them. A bad value ends the program at start-up with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tokensvc import config
from tokensvc.keyring import KeyRingError
from tokensvc.store import StoreUnavailable
from tokensvc.telemetry import current_trace_id


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace id. Never a token:
    the code logs session ids and jtis only."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        trace_id = current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokensvc import server  # imported here: `tokensvc health` stays light

    settings = config.load(args)
    setup_logging(settings.log_level)
    try:
        if settings.workers > 1:
            return server.serve_workers(settings)
        asyncio.run(server.serve(settings))
    except (KeyRingError, StoreUnavailable, RuntimeError, OSError) as err:
        # start-up failures (bad KEK, unreachable Redis, unreadable certificate) are one line
        print(f"tokensvc: cannot start: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.ca:
        creds = grpc.ssl_channel_credentials(
            Path(args.ca).read_bytes(),
            Path(args.key).read_bytes() if args.key else None,
            Path(args.cert).read_bytes() if args.cert else None,
        )
        channel = grpc.secure_channel(args.target, creds)
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as err:
            print(f"unhealthy: {err.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokensvc", description="tokensvc token service")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the token service")
    config.add_arguments(serve)
    serve.set_defaults(run=_cmd_serve)
    health = commands.add_parser("health", help="query a server's gRPC health service")
    env = os.environ.get
    health.add_argument("--target", default=env("TOKENSVC_HEALTH_TARGET", "127.0.0.1:50051"))
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=3.0)
    health.add_argument("--ca", default=env("TOKENSVC_HEALTH_CA"), help="CA bundle (enables TLS)")
    health.add_argument("--cert", default=env("TOKENSVC_HEALTH_CERT"), help="client cert (mTLS)")
    health.add_argument("--key", default=env("TOKENSVC_HEALTH_KEY"), help="client key (mTLS)")
    health.set_defaults(run=_cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except config.ConfigError as err:
        print(f"tokensvc: configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
