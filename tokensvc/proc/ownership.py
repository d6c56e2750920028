"""Who owns what while ``tokensvc serve`` runs: one service per listening address, one
embedded Redis per data directory, and no process that outlives its parent.

- :func:`claim_address`: the listeners use ``SO_REUSEPORT`` so that the workers of one
  ``serve`` share a port; without a check a second ``serve`` on the same address would
  silently get half of the connections. Before binding, ``serve`` takes a lock file for
  the address (closing the race between two starts) and binds a probe socket *without*
  ``SO_REUSEPORT``, which fails while anything listens there.
- :func:`lock_directory`: an ``fcntl`` lock on a directory's lock file, held as long as
  the process (or a child that inherited it) lives; the embedded Redis takes one on its
  data directory.
- :func:`die_with_parent`: on Linux the kernel sends SIGTERM to a worker when its parent
  dies, however it dies (``prctl(PR_SET_PDEATHSIG)``); workers also watch their parent's
  sentinel pipe (:mod:`tokensvc.runtime.workers`), the portable fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO

from tokensvc.errors import TokensvcError

_PR_SET_PDEATHSIG = 1


class StartupError(TokensvcError, RuntimeError):
    """The service cannot start; the message is the one line ``tokensvc serve`` prints."""

    code = "startup"


def lock_directory(directory: Path, what: str) -> IO[str]:
    """Lock ``directory`` for this process: returns the open lock file (keep it open).

    The file holds the owner's pid, for the message another start prints.

    Raises:
        StartupError: another process holds the lock.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "?"
        handle.close()
        raise StartupError(
            f"{what} {directory} is in use by another process (pid {owner})"
        ) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def claim_address(listen: str) -> IO[str] | None:
    """Make sure nothing serves ``listen`` (HOST:PORT) and keep others from claiming it.

    Returns the address's lock file, to keep open while serving (None for port 0: the
    kernel picks a free port, nobody can collide).

    Raises:
        StartupError: the address is in use ("address in use: ...").
    """
    host, _, port_text = listen.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    if port == 0:
        return None
    runtime = Path(tempfile.gettempdir()) / f"tokensvc-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    handle = (runtime / f"{host.replace(':', '_')}_{port}.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(f"address in use: {listen} (another tokensvc serves it)") from None
    try:
        _probe(host, port, listen)
    except BaseException:
        handle.close()
        raise
    return handle


def _probe(host: str, port: int, listen: str) -> None:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # gRPC reports an unresolvable host itself
    for family, kind, proto, _name, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR: connections of a previous run in TIME_WAIT do not count;
            # a listening socket (with or without SO_REUSEPORT) still does
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise StartupError(f"address in use: {listen}") from None
                # anything else (e.g. no IPv6 here) is for gRPC's own bind to report


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent process dies (Linux; elsewhere a no-op,
    the sentinel pipe of :mod:`tokensvc.runtime.workers` covers it). Also usable as a
    ``preexec_fn`` of a child that must not outlive us (the embedded redis-server)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
