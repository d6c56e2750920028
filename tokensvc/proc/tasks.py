"""Cancellation that survives redis-py: background loops check it themselves.

On Python 3.11 ``asyncio.wait_for`` (which redis-py uses to send a command when a socket
timeout is set) can lose a cancellation that arrives just as the wrapped call finishes.
A loop that reads ``cancelling_count()`` once and then checks ``cancelled_since`` each
round stops anyway.
"""

from __future__ import annotations

import asyncio


def cancelling_count() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def cancelled_since(baseline: int) -> bool:
    """Whether the current task was asked to cancel after ``baseline`` was read.

    On Python 3.11 ``asyncio.wait_for`` (which redis-py uses to send a command when a
    socket timeout is set) loses a cancellation that arrives just as the wrapped call
    finishes; without this check a cancelled loop could go on forever.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > baseline
