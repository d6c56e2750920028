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
- :func:`runtime_directory`: ``$TMPDIR/tokensvc-<uid>``, the address locks and the
  embedded Redis's socket when its data directory is too deep for one. ``$TMPDIR`` is
  shared with every local user, so the directory is checked before use (ours, mode 0700,
  not a symlink): one created first by someone else is refused, never used. Lock files
  are opened without following symlinks.
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
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO

from tokensvc.errors import TokensvcError

_PR_SET_PDEATHSIG = 1


class StartupError(TokensvcError, RuntimeError):
    """The service cannot start; the message is the one line ``tokensvc serve`` prints."""

    code = "startup"


def private_directory(path: Path, what: str) -> Path:
    """Create ``path`` (mode 0700) unless it exists, then check that it is a directory
    of this user that nobody else may enter: not a symlink (``lstat``), owned by our
    uid, no group or other permission bits.

    Raises:
        StartupError: the directory is not private to us (one line: what to do).
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"{what} {path} is not a directory (a symlink or a file): remove it")
    if info.st_uid != os.getuid():
        raise StartupError(
            f"{what} {path} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.getuid()}): remove it, or set TMPDIR to a private directory"
        )
    if info.st_mode & 0o077:
        raise StartupError(
            f"{what} {path} is open to other users (mode {info.st_mode & 0o777:o}): "
            "chmod 700 it or remove it"
        )
    return path


def runtime_directory() -> Path:
    """This user's private directory for lock files and sockets, ``$TMPDIR/tokensvc-<uid>``
    (checked by :func:`private_directory`).

    Raises:
        StartupError: the directory exists and is not private to us.
    """
    base = Path(tempfile.gettempdir()) / f"tokensvc-{os.getuid()}"
    return private_directory(base, "the runtime directory")


def _open_lock(path: Path) -> IO[str]:
    """Open (create, mode 0600) the lock file ``path`` without following a symlink."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StartupError(f"lock file {path} is a symlink: remove it") from None
        raise
    return os.fdopen(fd, "a+")


def lock_directory(directory: Path, what: str) -> IO[str]:
    """Lock ``directory`` for this process: returns the open lock file (keep it open).

    The file holds the owner's pid, for the message another start prints.

    Raises:
        StartupError: another process holds the lock, or the lock file is a symlink.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = _open_lock(directory / "lock")
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
        StartupError: the address is in use ("address in use: ..."), or the runtime
            directory holding the address locks is not private (:func:`runtime_directory`).
    """
    host, _, port_text = listen.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    if port == 0:
        return None
    handle = _open_lock(runtime_directory() / f"{host.replace(':', '_')}_{port}.lock")
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
