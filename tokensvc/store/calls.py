"""Calling Redis from the store: failures mapped to :class:`StoreUnavailable`, reply values
as text, and the sources of the Lua scripts."""

from __future__ import annotations

from collections import Counter
from importlib import resources
from typing import Any

from redis.exceptions import (
    AskError,
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
    Redis Cluster CLUSTERDOWN, TRYAGAIN, a slot being moved (MOVED/ASK reaching us from a
    pipeline that must not follow them), a slot map that does not cover the key, or no
    node reachable. Any other error (a bug, e.g. keys of two slots) is raised as is.
    """
    try:
        return await fn(*args, **kwargs)
    except (RedisConnectionError, RedisTimeoutError, OSError) as err:
        raise _down("redis unavailable", err) from err
    except (ClusterError, TryAgainError, AskError, ReadOnlyError, SlotNotCoveredError) as err:
        # ClusterError: CLUSTERDOWN, MASTERDOWN, redirections exhausted; AskError: also MOVED
        raise _down("redis not ready", err) from err
    except RedisClusterException as err:
        if str(err).startswith(_CLUSTER_UNREACHABLE):
            raise _down("redis cluster unreachable", err) from err
        raise
    except RedisError as err:
        if any(word in str(err) for word in _NOT_READY):
            raise _down("redis not ready", err) from err
        raise


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
