"""Calling Redis from the store: failures mapped to :class:`StoreUnavailable`, reply values
as text, and the sources of the Lua scripts."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from importlib import resources
from typing import Any, Final

from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokensvc.errors import TokensvcError


class StoreUnavailable(TokensvcError, RuntimeError):
    """Redis is unreachable or timed out; nothing was (or can be known to be) written."""

    code = "store_unavailable"


#: StoreUnavailable raised by :func:`guarded` in this process, by the Redis error's class
#: name (a handful of kinds); the ``tokensvc_redis_unavailable_total`` metric reads it.
UNAVAILABLE: Counter[str] = Counter()


#: Retries of a command refused because its slot was moving (TRYAGAIN, ASK/MOVED that
#: reached us); a metric.
SLOT_RETRIES: Counter[str] = Counter()

#: How long a call without a deadline of its own keeps retrying a moving slot, seconds.
SLOT_MOVE_BUDGET: Final = 5.0
_FIRST_PAUSE: Final = 0.01
_MAX_PAUSE: Final = 0.1
# (monotonic) time the current call must have answered by; None: SLOT_MOVE_BUDGET
_deadline: ContextVar[float | None] = ContextVar("tokensvc_store_deadline", default=None)


@contextmanager
def call_deadline(seconds_left: float | None) -> Iterator[None]:
    """Within the block, :func:`guarded` retries a moving slot only until ``seconds_left``
    from now (the gRPC call's remaining time; ``None``: :data:`SLOT_MOVE_BUDGET` per
    Redis call)."""
    token = enter_deadline(seconds_left)
    try:
        yield
    finally:
        leave_deadline(token)


def enter_deadline(seconds_left: float | None) -> Token[float | None]:
    """:func:`call_deadline`'s entry, for a hot path that cannot afford a generator: pass
    what it returns to :func:`leave_deadline` (in a ``finally``)."""
    return _deadline.set(None if seconds_left is None else time.monotonic() + seconds_left)


def leave_deadline(token: Token[float | None]) -> None:
    """:func:`call_deadline`'s exit (see :func:`enter_deadline`)."""
    _deadline.reset(token)


def _slot_moving(err: Exception) -> bool:
    """Whether Redis refused the command *without running it* because its slot is being
    migrated: TRYAGAIN (a multi-key command, or a script, whose keys are split between the
    two nodes or missing on the one asked), ASK/MOVED that reached us (a pipeline that does
    not follow them), or redis-py giving up after following them ("TTL exhausted")."""
    if isinstance(err, TryAgainError | AskError):  # AskError: MovedError too
        return True
    if isinstance(err, ClusterDownError):
        return False
    if isinstance(err, ClusterError):
        return "TTL exhausted" in str(err)
    message = str(err)  # Redis 6 wraps a script's refusal in its own error
    return isinstance(err, RedisError) and any(
        word in message for word in ("TRYAGAIN", "-ASK ", "-MOVED ")
    )


def _down(message: str, err: Exception) -> StoreUnavailable:
    UNAVAILABLE[type(err).__name__] += 1
    return StoreUnavailable(f"{message}: {type(err).__name__}")


# replies of a server that cannot take the command now, also when they come wrapped in a
# script error (Redis 6 reports "ERR Error running script ... -READONLY ...")
_NOT_READY = ("LOADING", "MASTERDOWN", "READONLY", "NOREPLICAS", "CLUSTERDOWN", "TRYAGAIN")
# RedisCluster's own errors when no startup node answers or the slots are not all served
_CLUSTER_UNREACHABLE = ("Redis Cluster cannot be connected", "All slots are not covered")


async def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Await a Redis call; connection trouble and failovers become :class:`StoreUnavailable`.

    Unavailable means the command did not run, or may have run but its reply was lost; the
    caller may retry. That is: connection errors and timeouts (including Sentinel's
    MasterNotFoundError, no primary known, and a server still loading its data), a primary
    without its replicas (MASTERDOWN, NOREPLICAS), a demoted primary (READONLY), and on
    Redis Cluster CLUSTERDOWN, a slot map that does not cover the key, or no node
    reachable. Any other error (a bug, e.g. keys of two slots) is raised as is.

    A command refused because its slot is moving (Redis Cluster resharding, see
    :func:`_slot_moving`) did not run, so it is sent again after a short pause (10 ms
    doubling to 100 ms) until the call's deadline (:func:`call_deadline`): a migration
    costs latency, not errors. Past the deadline it is unavailable too.
    """
    deadline = _deadline.get()
    if deadline is None:
        deadline = time.monotonic() + SLOT_MOVE_BUDGET
    pause = _FIRST_PAUSE
    while True:
        try:
            return await fn(*args, **kwargs)
        except Exception as err:
            if not _slot_moving(err) or time.monotonic() + pause >= deadline:
                down = _unavailable(err)
                if down is None:
                    raise
                raise down from err
            SLOT_RETRIES[type(err).__name__] += 1
        await asyncio.sleep(pause)
        pause = min(pause * 2, _MAX_PAUSE)


def _unavailable(err: Exception) -> StoreUnavailable | None:
    """What :func:`guarded` raises for ``err`` (``None``: ``err`` itself)."""
    if isinstance(err, RedisConnectionError | RedisTimeoutError | OSError):
        return _down("redis unavailable", err)
    if isinstance(
        err, ClusterError | TryAgainError | AskError | ReadOnlyError | SlotNotCoveredError
    ):
        # ClusterError: CLUSTERDOWN, MASTERDOWN, redirections exhausted; AskError: also MOVED
        return _down("redis not ready", err)
    if isinstance(err, RedisClusterException):
        if str(err).startswith(_CLUSTER_UNREACHABLE):
            return _down("redis cluster unreachable", err)
        return None
    if isinstance(err, RedisError) and any(word in str(err) for word in _NOT_READY):
        return _down("redis not ready", err)
    return None


def text(value: Any) -> str:
    """A Redis reply value as text (``None``: the empty string)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def script_source(name: str, *, gcra: bool = False, feed: bool = False) -> str:
    """A Lua script's source; ``gcra`` prepends the rate-limiting function, ``feed`` the
    revocation feed's ``emit``."""
    lua = resources.files("tokensvc.store").joinpath("lua")
    prelude = "".join(
        lua.joinpath(f"{lib}.lua").read_text()
        for lib, wanted in (("gcra", gcra), ("feed", feed))
        if wanted
    )
    return prelude + lua.joinpath(name).read_text()
