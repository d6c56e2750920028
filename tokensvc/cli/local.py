"""Where commands that talk to Redis directly find it: ``audit tail`` and ``keys rewrap``.

Both take ``--redis-url`` (else ``TOKENSVC_REDIS_URL``) or, for a ``tokensvc serve`` with an
embedded Redis (``make run``), ``--data-dir`` (else ``TOKENSVC_DATA_DIR``, else
``.tokensvc``): its Redis listens on a unix socket inside that directory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tokensvc import config
from tokensvc.redis import connection


def add_redis_args(cmd: argparse.ArgumentParser) -> None:
    """``--redis-url`` and ``--data-dir``, as ``serve`` names them."""
    cmd.add_argument(
        "--redis-url",
        default=None,
        help="Redis URL [env TOKENSVC_REDIS_URL; default: the embedded Redis of --data-dir]",
    )
    cmd.add_argument(
        "--data-dir",
        default=None,
        help="data directory of a `tokensvc serve` with embedded Redis "
        "[env TOKENSVC_DATA_DIR; default .tokensvc]",
    )


def data_dir(args: argparse.Namespace) -> Path:
    """``--data-dir``, else ``TOKENSVC_DATA_DIR``, else serve's default."""
    return Path(
        args.data_dir or os.environ.get("TOKENSVC_DATA_DIR") or config.Settings().data_dir
    ).expanduser()


def redis_url(args: argparse.Namespace) -> str:
    """--redis-url, else TOKENSVC_REDIS_URL, else the embedded Redis of the data directory
    (the unix socket ``tokensvc serve`` without --redis-url listens on).

    Raises:
        config.ConfigError: a bad URL.
        RuntimeError: no embedded Redis running in the data directory.
    """
    url = args.redis_url or os.environ.get("TOKENSVC_REDIS_URL") or None
    if url is not None:
        connection.check_url(url)
        return str(url)
    directory = data_dir(args)
    # the embedded Redis of tokensvc.runtime.server.start: RedisProcess(data_dir / "redis",
    # unix_socket=True), on a unix socket only (see tokensvc.redis.embedded.socket_path)
    from tokensvc.redis.embedded import socket_path as embedded_socket

    socket_path = embedded_socket(directory / "redis")
    if not socket_path.is_socket():
        raise RuntimeError(
            f"no embedded Redis running in {directory} (start `tokensvc serve --data-dir "
            f"{directory}` or pass --redis-url)"
        )
    return f"unix://{socket_path}"
