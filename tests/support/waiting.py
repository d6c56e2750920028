"""Waiting for a condition: the one polling helper of the suite (a blocking and an asyncio twin).

Tests wait for what they need to see -- a key promoted, a failover done, a log line written --
instead of sleeping a fixed time and hoping. A timeout is an upper bound only: a condition
that holds returns at once, so a generous bound costs nothing on a quiet machine.

``TOKENSVC_TEST_TIME_FACTOR`` (default 3) multiplies every bound, so a busy machine (two
cores shared with other jobs, a CI runner) can be given more room without touching the
tests; the bounds written in the tests are what a quiet machine needs.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: how much longer than on a quiet machine a wait may take (``TOKENSVC_TEST_TIME_FACTOR``)
TIME_FACTOR = float(os.environ.get("TOKENSVC_TEST_TIME_FACTOR", "3"))


def scaled(seconds: float) -> float:
    """``seconds`` (what a quiet machine needs) times :data:`TIME_FACTOR`."""
    return seconds * TIME_FACTOR


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.02,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    Fails with an :class:`AssertionError` naming ``what`` (and the last value or ignored
    exception) after ``timeout`` seconds scaled by :data:`TIME_FACTOR`. Exceptions of the
    ``ignore`` types count as "not yet" (e.g. a Redis node still restarting)."""
    bound = scaled(timeout)
    deadline = time.monotonic() + bound
    last: object = None
    while True:
        try:
            last = predicate()
        except ignore as err:
            last = err
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g} s: {what} (last: {last!r})")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.01,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """:func:`wait_until` for asyncio tests: ``predicate`` may be a coroutine function; the
    loop keeps running between calls."""
    bound = scaled(timeout)
    deadline = time.monotonic() + bound
    last: object = None
    while True:
        try:
            value = predicate()
            last = await value if inspect.isawaitable(value) else value
        except ignore as err:
            last = err
        else:
            if last:
                return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g} s: {what} (last: {last!r})")
        await asyncio.sleep(interval)
