"""``tokensvc serve --workers N``: N server processes sharing one port (``SO_REUSEPORT``)
under one parent, which owns the address and the embedded Redis.

The parent checks the configuration once (:func:`tokensvc.runtime.startup.check`: TLS files, KEK,
Redis, replicas; it also creates the development KEK and the first signing key, so the
workers never race for them), then starts the workers and forwards SIGTERM/SIGINT to them.
Workers never outlive it: the kernel signals them when it dies (Linux
``PR_SET_PDEATHSIG``), and each also watches its parent's sentinel pipe. If a worker fails
to start, the others are stopped and ``serve`` exits 2.

Metrics are per process: worker ``i`` (1..N) serves ``--metrics-listen HOST:PORT`` on
PORT+i-1, a port of its own (not shared, so a second ``serve`` there fails to bind), and
``/metrics`` is not served on the shared ``--http-listen`` port (see :func:`worker_settings`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys

from tokensvc.config import Settings
from tokensvc.errors import ConfigError
from tokensvc.keys.ring import KeyRingError
from tokensvc.observe.logs import setup_logging
from tokensvc.proc.ownership import StartupError, die_with_parent
from tokensvc.redis.embedded import Keeper, RedisProcess
from tokensvc.runtime import server, startup

log = logging.getLogger("tokensvc.workers")
#: exit code of a worker (and of ``serve``) that could not start
START_FAILED = 2


def worker_settings(settings: Settings, number: int) -> Settings:
    """The settings of worker ``number`` (1..N): its ``--metrics-listen`` port is
    PORT+number-1, so each worker is a scrape target of its own with steady counters (a
    shared port would hand each scrape to a random worker). Port 0 stays 0 (any free port).
    """
    listen = settings.metrics_listen
    if listen is None:
        return settings
    host, _, port = listen.rpartition(":")
    if int(port) == 0:
        return settings
    return dataclasses.replace(settings, metrics_listen=f"{host}:{int(port) + number - 1}")


def _worker_main(settings: Settings, number: int) -> None:
    """Entry point of worker ``number`` (multiprocessing, spawn)."""
    die_with_parent()
    setup_logging(settings.log_level, worker=number)
    settings = worker_settings(settings, number)
    parent = multiprocessing.parent_process()
    sentinel = parent.sentinel if parent is not None else None
    try:
        server.run(settings, parent_sentinel=sentinel)
    except (StartupError, ConfigError, KeyRingError) as err:
        print(f"tokensvc: cannot start: {err} (worker {number})", file=sys.stderr, flush=True)
        sys.exit(START_FAILED)
    except KeyboardInterrupt:
        pass


def serve_workers(settings: Settings) -> int:
    """Run ``settings.workers`` server processes on one port until they have all exited.

    Returns the exit code for ``serve``: 0 after a clean shutdown, 2 when a worker could
    not start.

    Raises:
        StartupError, ConfigError: the checks before any worker started failed.
    """
    embedded = None
    if settings.redis_url is None:
        embedded = RedisProcess(settings.data_dir / "redis", unix_socket=True, prefer_system=False)
        embedded.start()
        log.info("embedded redis-server started, data in %s", embedded.data_dir)
        settings = dataclasses.replace(settings, redis_url=embedded.url)
    try:
        asyncio.run(startup.check(settings))
        return _supervise(settings, Keeper(embedded) if embedded is not None else None)
    finally:
        if embedded is not None:
            embedded.stop()


def _supervise(settings: Settings, keeper: Keeper | None = None) -> int:
    """Start the workers and wait for them (see :func:`serve_workers`).

    Workers are spawned (a fresh interpreter), never forked: for its checks the parent has
    opened Redis connections and, with ``--pkcs11-module``, initialised the PKCS#11 library
    and logged in, and a PKCS#11 ``C_Initialize``, login and sessions belong to the process
    that made them (gRPC does not support ``fork`` either). Each worker therefore
    initialises the module, logs in and opens its sessions itself (docs/key-custody.md,
    Workers; tests/keys/test_pkcs11_workers.py fails on forked workers).
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_main, args=(settings, number), daemon=False)
        for number in range(1, settings.workers + 1)
    ]
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for proc in procs:
        proc.start()
    running = {proc.sentinel: proc for proc in procs}
    code = 0
    while running:
        # each second at least: the embedded Redis is ours to restart if it died
        ready = multiprocessing.connection.wait(list(running), timeout=1.0)
        if keeper is not None:
            keeper.check()
        for sentinel in ready:
            proc = running.pop(int(sentinel))  # type: ignore[arg-type]
            proc.join()
            if proc.exitcode and not stopping:
                # a worker that could not start (or crashed): stop the others
                code = START_FAILED if proc.exitcode == START_FAILED else 1
                stop_all()
    return code
