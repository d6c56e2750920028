"""Redis clients for every ``--redis-url`` topology, built on redis-py's own support.

``redis://`` / ``rediss://`` (TLS) / ``unix://``
    One server (or a primary whose failover someone else handles), via
    ``Redis.from_url``; every query parameter redis-py knows is accepted.
``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[?db=N&...]``
    A primary found through Sentinel. The hosts are sentinels (port 26379 when left
    out); the credentials are the data nodes'. Query parameters: ``db``,
    ``sentinel_username``, ``sentinel_password`` (percent-encode special characters).
    Connections follow the primary named by the sentinels after a failover; a
    connection still open to a demoted primary fails once (READONLY) and reconnects.
``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]``
    Redis Cluster (port 6379 when left out); the hosts are startup nodes, the rest of
    the cluster is discovered. No query parameters; database 0 only.

Timeouts are per connection, not per command, when a client is made with a
:class:`tokensvc.redis.watchdog.Watchdog` (the server's): see that module. Without one
(command-line tools) the socket timeout applies per command as usual. A client made with a
watchdog also carries a lean link for the hot scripts, under the same rules: a
:class:`tokensvc.redis.lean.LeanLink` (one server, Sentinel) on connections its own pool
makes, or for Cluster a :class:`tokensvc.redis.lean_cluster.LeanClusterLink` on
connections to each primary made as redis-py makes that node's, routed by redis-py's own
slot map.

Every client sends each command exactly once: no retry on a connection error or a
timeout at any level (a Refresh whose reply was lost would be re-sent with a spent token
and revoke the family; see :mod:`tokensvc.store`). Such failures surface as
:class:`tokensvc.store.StoreUnavailable` and callers retry on their own terms. What is
still done automatically is what cannot execute a command twice: Cluster ``MOVED``/``ASK``
redirections and ``TRYAGAIN`` (the node refused the command without running it), a
``NOSCRIPT`` reload (the script did not run), and re-discovering the cluster layout or
the current primary before the *next* command. redis-py follows ``MOVED``/``ASK`` and
retries ``TRYAGAIN`` only a few times (16 attempts, under half a second: "TTL
exhausted"); the lean Cluster link follows ``MOVED``/``ASK`` a few times and leaves
``TRYAGAIN`` to its caller. Either is shorter than a slot migration, in which every
script naming a key that does not exist yet is answered ``TRYAGAIN``;
:func:`tokensvc.store.guarded` retries such refusals on with a short back-off until the
gRPC call's deadline, so a migration costs latency, not errors.

Guarantees per topology (``--redis-wait-replicas`` is ``FamilyStore.settle``):

* Single server: a reply means the write is in the server's memory; what survives a crash
  is the server's persistence setting (the embedded server: AOF, fsync every second).
* Sentinel and Cluster replicate asynchronously: a write acknowledged just before its
  primary dies can be missing on the replica that takes over. With
  ``--redis-wait-replicas N`` every revocation (by token, session or subject) is followed,
  on one connection to the primary holding it, by a write to a fence key in the same hash
  slot and ``WAIT N``; Revoke/LockSubject succeed only once N replicas have everything up
  to the fence, else they fail UNAVAILABLE and the caller retries (revocations are
  idempotent; the revocation is in force on the primary meanwhile). Sentinel and Cluster
  promote a replica that is reachable and, by preference, the most up to date, so an
  acknowledged revocation survives losing its primary as long as a replica that
  confirmed it is the one promoted: always with a single replica.
* WAIT is not consensus: it does not fsync; it cannot help if every replica that had the
  write is lost too, or an operator forces a stale replica up; a failover that
  *completes* between a revocation and its fence (it takes at least the down-after time
  or node timeout) goes unnoticed.
* With ``--redis-wait-replicas N`` Issue and Refresh wait too: they answer OK only once
  N replicas have the new family or the rotation, else UNAVAILABLE (the write is in
  force on the primary). A client retrying that Refresh with the same token gets the same
  successor within the grace window (``--refresh-grace-seconds``; without one the retry
  is reuse, hence a start-up warning). On Cluster a revocation waits on two primaries:
  the one holding it and the one holding the revocation stream its event went to.
* Cluster: every script and pipeline touches keys of one hash slot (a subject's keys
  share the hash tag ``{T}``, the key ring ``{keyring}``), so each operation is atomic on
  one primary, and different subjects spread over the shards. Subject-wide revocation is
  a watermark in the subject's own slot, so no step spans two primaries.
* TLS: ``rediss://`` only; the Sentinel and Cluster URLs have no TLS option yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import parse_qsl, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from tokensvc.errors import ConfigError
from tokensvc.redis.lean import LeanLink
from tokensvc.redis.lean_cluster import LeanClusterLink
from tokensvc.redis.watchdog import Watchdog

#: What :func:`redis_client` returns: one server or Sentinel primary, or a cluster.
RedisClient: TypeAlias = aioredis.Redis | RedisCluster

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
#: Every ``--redis-url`` scheme: one server (plain, TLS, unix socket), Sentinel, Cluster.
SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME, CLUSTER_SCHEME)
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_REDIS_PORT = 6379

# a host name or IPv4 address; IPv6 addresses come in brackets
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")
_IPV6 = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[A-Za-z0-9._-]+)?)\]")
_MASTER_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """A parsed ``redis+cluster://`` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _no_maint() -> MaintNotificationsConfig:
    """Redis Enterprise's maintenance notifications off: with them on ("auto", the default)
    redis-py's pool no longer checks that a pooled connection is still open before handing
    it out, so after a Redis restart each stale connection would fail one call."""
    return MaintNotificationsConfig(enabled=False)


def redis_client(url: str, timeout: float, watchdog: Watchdog | None = None) -> RedisClient:
    """An asyncio client for ``url`` that never retries a command on its own; with a
    ``watchdog``, ``timeout`` is enforced per connection by it instead of per command.

    Raises:
        ConfigError: the URL is malformed or of an unknown scheme (:func:`check_url`).
    """
    target = check_url(url)
    if isinstance(target, SentinelTarget):
        return _sentinel_client(target, timeout, watchdog)
    if isinstance(target, ClusterTarget):
        return _cluster_client(target, timeout, watchdog)
    client = LeanRedis.from_url(
        url,
        socket_timeout=None if watchdog else timeout,
        socket_connect_timeout=timeout,
        retry=_no_retry(),
        retry_on_timeout=False,
        maint_notifications_config=_no_maint(),
    )
    assert isinstance(client, LeanRedis)  # from_url builds the class it is called on
    _watch_pool(client, watchdog)
    return client


def _watch_pool(client: LeanRedis, watchdog: Watchdog | None) -> None:
    if watchdog is not None:  # before any connection exists: from_url picked the class
        pool = client.connection_pool
        pool.connection_class = watchdog.connection_class(pool.connection_class)
        # the server's client: its hot scripts take the lean path (tokensvc.redis.lean)
        client.lean = LeanLink(client)


class LeanRedis(aioredis.Redis):
    """A redis-py client that may carry a :class:`~tokensvc.redis.lean.LeanLink` for the
    hot scripts (the server's, made with a watchdog); :meth:`aclose` closes it too."""

    lean: LeanLink | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            if self.lean is not None:
                await self.lean.aclose()
        finally:
            await super().aclose(close_connection_pool)


class SentinelPrimary(LeanRedis):
    """The client of a Sentinel-managed primary; :meth:`aclose` also closes the
    connections to the sentinels."""

    sentinels: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            if self.sentinels is not None:
                await self.sentinels.aclose()


def _sentinel_client(
    target: SentinelTarget, timeout: float, watchdog: Watchdog | None
) -> SentinelPrimary:
    # asking sentinels (rare: at connect and after a failover) keeps a per-command timeout
    asking = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]  # typed since redis 8.2
        list(target.sentinels),
        # asking sentinels is read-only, but several are listed: move on to the next one
        sentinel_kwargs={
            **asking,
            "retry": _no_retry(),
            "username": target.sentinel_username,
            "password": target.sentinel_password,
        },
        socket_timeout=None if watchdog else timeout,
        socket_connect_timeout=timeout,
        retry=_no_retry(),
        retry_on_timeout=False,
        maint_notifications_config=_no_maint(),
        username=target.username,
        password=target.password,
        db=target.db,
    )
    client: SentinelPrimary = sentinel.master_for(target.master, redis_class=SentinelPrimary)
    client.sentinels = sentinel
    _watch_pool(client, watchdog)
    return client


class LeanCluster(RedisCluster):
    """A Redis Cluster client that may carry a
    :class:`~tokensvc.redis.lean_cluster.LeanClusterLink` for the hot scripts (the
    server's, made with a watchdog); :meth:`aclose` closes it too."""

    lean: LeanClusterLink | None = None

    async def aclose(self) -> None:
        try:
            if self.lean is not None:
                await self.lean.aclose()
        finally:
            await super().aclose()


def _cluster_client(
    target: ClusterTarget, timeout: float, watchdog: Watchdog | None
) -> LeanCluster:
    client = LeanCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        username=target.username,
        password=target.password,
        socket_timeout=None if watchdog else timeout,
        socket_connect_timeout=timeout,
        # RedisCluster re-sends a command after a connection error or timeout (refreshing
        # the slot map first) unless told otherwise; redirections are followed regardless
        retry=_no_retry(),
        require_full_coverage=True,
        maint_notifications_config=_no_maint(),
    )
    if watchdog is not None:  # RedisCluster takes no connection class: set it on the nodes
        watched = watchdog.connection_class(Connection)
        client.connection_kwargs["connection_class"] = watched
        client.nodes_manager.connection_kwargs["connection_class"] = watched
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = watched
        # the server's client: its hot scripts take the lean path (tokensvc.redis.lean_cluster)
        client.lean = LeanClusterLink(client)
    return client


def _redacted(url: str) -> str:
    """The URL without the password, for error messages."""
    scheme, sep, rest = url.partition("://")
    netloc_end = len(rest)
    for mark in "/?#":
        pos = rest.find(mark)
        if pos != -1:
            netloc_end = min(netloc_end, pos)
    userinfo, at, hosts = rest[:netloc_end].rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        return f"{scheme}{sep}{user}:***@{hosts}{rest[netloc_end:]}"
    return url


def _fail(url: str, problem: str) -> ConfigError:
    return ConfigError(f"--redis-url {_redacted(url)}: {problem}")


def _split(url: str, scheme: str) -> tuple[str | None, str | None, str, str, dict[str, str]]:
    """(username, password, hosts, path, query) of a ``scheme://`` URL."""
    prefix = scheme + "://"
    if not url.lower().startswith(prefix):
        raise _fail(url, f"must start with {prefix}")
    rest = url[len(prefix) :]
    if "#" in rest:
        raise _fail(url, "a fragment (#...) is not allowed")
    rest, _, query_text = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if username is None and password is None:
            raise _fail(url, "empty credentials before '@'")
    query: dict[str, str] = {}
    if query_text:
        try:
            pairs = parse_qsl(query_text, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise _fail(url, "malformed query string") from None
        for key, value in pairs:
            if key in query:
                raise _fail(url, f"query parameter {key!r} given twice")
            query[key] = value
    return username, password, hosts, (slash + path), query


def _hosts(url: str, text: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not text:
        raise _fail(url, "at least one HOST:PORT is required")
    hosts: list[tuple[str, int]] = []
    for item in text.split(","):
        item = item.strip()
        v6 = _IPV6.match(item)
        if v6:
            host, rest = v6.group(1), item[v6.end() :]
        else:
            host, colon, port_text = item.partition(":")
            rest = colon + port_text
            if not _HOSTNAME.fullmatch(host):
                raise _fail(url, f"bad host {item!r} (HOST:PORT, IPv6 as [ADDR]:PORT)")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise _fail(url, f"bad port in {item!r}")
            port = int(rest[1:])
        else:
            port = default_port
        if not 0 < port < 65536:
            raise _fail(url, f"port out of range in {item!r}")
        if (host, port) in hosts:
            raise _fail(url, f"{item!r} is listed twice")
        hosts.append((host, port))
    return tuple(hosts)


def _only(url: str, query: dict[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        known = ", ".join(allowed) if allowed else "none"
        raise _fail(url, f"unknown query parameter {unknown[0]!r} (allowed: {known})")


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[[USER]:PASSWORD@]HOST:PORT[,...]/MASTER[?db=N&...]``.

    Raises:
        ConfigError: naming what is wrong (the password is never repeated).
    """
    username, password, hosts, path, query = _split(url, SENTINEL_SCHEME)
    allowed = ("db", "sentinel_username", "sentinel_password")
    _only(url, query, allowed)
    sentinels = _hosts(url, hosts, DEFAULT_SENTINEL_PORT)
    master = unquote(path[1:]) if path.startswith("/") else ""
    if not master:
        raise _fail(url, "the master name is required: redis+sentinel://HOST:PORT,.../MASTER")
    if not _MASTER_NAME.fullmatch(master):
        raise _fail(url, f"bad master name {master!r} (letters, digits, '.', '_', ':', '-')")
    db_text = query.get("db", "0")
    if not db_text.isdigit() or int(db_text) > 1_000_000:
        raise _fail(url, f"db must be a database number, got {db_text!r}")
    return SentinelTarget(
        sentinels=sentinels,
        master=master,
        db=int(db_text),
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


def parse_cluster_url(url: str) -> ClusterTarget:
    """Parse ``redis+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]``.

    Raises:
        ConfigError: naming what is wrong (the password is never repeated).
    """
    username, password, hosts, path, query = _split(url, CLUSTER_SCHEME)
    _only(url, query, ())
    if path not in ("", "/", "/0"):
        raise _fail(url, "Redis Cluster has only database 0; no path is allowed")
    return ClusterTarget(_hosts(url, hosts, DEFAULT_REDIS_PORT), username, password)


def check_url(url: str) -> SentinelTarget | ClusterTarget | None:
    """THE ``--redis-url`` check, for ``serve``'s configuration, every command that takes
    ``--redis-url`` and :func:`redis_client`: the scheme (one of :data:`SCHEMES`, lower
    case), a numeric port in range, and the whole Sentinel or Cluster form.

    Returns:
        The parsed Sentinel or Cluster target; ``None`` for a one-server URL (whose other
        parts redis-py checks when it connects).

    Raises:
        ConfigError: naming what is wrong (password hidden).
    """
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        return parse_sentinel_url(url)
    if url.startswith(f"{CLUSTER_SCHEME}://"):
        return parse_cluster_url(url)
    if not url.startswith(tuple(f"{scheme}://" for scheme in SCHEMES)):
        raise ConfigError(
            f"--redis-url must start with one of {', '.join(f'{s}://' for s in SCHEMES)}"
        )
    try:
        urlsplit(url).port  # noqa: B018 -- raises for a port that is not a number
    except ValueError as err:
        raise ConfigError(f"--redis-url: {err}") from None
    return None
