"""CPU time of processes read from ``/proc``: what a request costs the server, which is far
more stable than requests per second on a shared machine (and what a user's bill is made of).

A server is the process the benchmark started plus every descendant (the worker processes
of ``--workers N``). Each thread's time on a CPU comes from
``/proc/<pid>/task/<tid>/schedstat`` (its first field: nanoseconds, exact, kept by the
scheduler) rather than ``/proc/<pid>/stat``'s utime + stime (sampled at each clock tick,
10 ms: a few hundred ticks per row leave several per cent of noise). A thread that exits
during the window takes its time with it; grpc's and redis-server's threads live as long
as the process. Without ``schedstat`` (kernel built without it) the tick counts are used.
"""

from __future__ import annotations

import os
from pathlib import Path

_PROC = Path("/proc")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:  # gone, or no /proc (not Linux)
        return None
    # the command name (field 2) is in parentheses and may contain spaces
    return raw[raw.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def _schedstat_ns(pid: int) -> int | None:
    """Nanoseconds on a CPU of every thread of ``pid`` so far (``None``: not available)."""
    try:
        tasks = list((_PROC / str(pid) / "task").iterdir())
    except OSError:
        return None
    total = 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended just now
    return total


_HAS_SCHEDSTAT = (_PROC / "self" / "schedstat").exists()


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds so far of ``pids`` (those still alive): from ``schedstat`` where the
    kernel keeps it, else user + system ticks."""
    if _HAS_SCHEDSTAT:
        return sum(_schedstat_ns(pid) or 0 for pid in pids) / 1e9
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            # after the name: state ppid ... utime is field 14 of the whole line, index 11 here
            total += int(fields[11]) + int(fields[12])
    return total / _TICK


class CpuMeter:
    """CPU of a process tree over a window: ``start()``, run the load, ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pids: list[int] = []
        self._begin = 0.0

    def start(self) -> None:
        self._pids = descendants(self.pid)
        self._begin = cpu_seconds(self._pids)

    def stop(self) -> float:
        """CPU seconds used since :meth:`start`."""
        return cpu_seconds(self._pids) - self._begin
