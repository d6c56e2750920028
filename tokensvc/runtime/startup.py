"""Start-up checks of ``tokensvc serve``: what must hold before a server listens, and the
one line each failure is reported with (the CLI prints it and exits 2).

:func:`check_redis` proves the Redis URL reaches a Redis (not just any listener) and warns
loudly when it has fewer replicas than ``--redis-wait-replicas``; :func:`unavailable`
words an unreachable Redis with its address and redis-py's reason; :func:`check` runs
every check without serving, for the parent of ``--workers N`` (so a bad setting is
reported once, and the development KEK and the first signing key are created once, before
any worker starts).
"""

from __future__ import annotations

import logging

from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import RedisError

from tokensvc.config import Settings
from tokensvc.keys.backend import pkcs11_backend
from tokensvc.keys.ring import KeyRing, load_kek
from tokensvc.proc.ownership import StartupError
from tokensvc.redis.connection import RedisClient, redis_client
from tokensvc.store import StoreUnavailable, guarded

log = logging.getLogger("tokensvc.startup")


def where(url: str) -> str:
    """A Redis URL without its credentials, for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def unavailable(err: StoreUnavailable, url: str) -> StartupError:
    """ "redis unavailable ... at ADDRESS: REASON" (redis-py's own error names the reason)."""
    cause = err.__cause__
    reason = f": {cause}" if cause else ""
    if isinstance(cause, MasterNotFoundError):
        # redis-py's text carries the repr of a whole client (pools, connections, ...)
        reason = ": no Sentinel of the URL knows a primary of that service name (check the "
        reason += "name after the last /, and that the Sentinels are reachable)"
    return StartupError(f"{err} at {where(url)}{reason}")


async def check_redis(redis: RedisClient, settings: Settings, url: str) -> None:
    """Prove ``url`` is a reachable Redis; warn loudly when it has fewer replicas than
    ``--redis-wait-replicas`` needs.

    Without them every Issue, Refresh, Revoke and LockSubject fails UNAVAILABLE (the
    write is in force on the primary, but not confirmed). That is a warning, not a refusal to start:
    a replica restarting during Redis maintenance must not turn into a tokensvc outage,
    and Revokes succeed again as soon as the replicas are back.

    Raises:
        StartupError: naming the address and the reason.
    """
    warn_wait_without_grace(settings)
    try:
        await guarded(redis.ping)
        wanted = settings.redis_wait_replicas
        if not wanted:
            return
        info = await guarded(redis.info, "replication")
        # a cluster answers per node ({node: info}), one server with its own info
        nodes = info.values() if all(isinstance(v, dict) for v in info.values()) else [info]
        primaries = [node for node in nodes if node.get("role") == "master"]
        have = min((int(node.get("connected_slaves", 0)) for node in primaries), default=0)
    except StoreUnavailable as err:
        raise unavailable(err, url) from err
    except RedisError as err:
        raise StartupError(f"{where(url)} does not answer as Redis: {err}") from err
    if have < wanted:
        log.error(
            "--redis-wait-replicas %d, but the Redis primary at %s has %d connected "
            "replica(s): every Issue, Refresh, Revoke and LockSubject fails UNAVAILABLE "
            "until enough replicas are connected; set it to at most the replicas you run "
            "(0 without replication)",
            wanted,
            where(url),
            have,
        )


def warn_wait_without_grace(settings: Settings) -> None:
    """Warn when ``--redis-wait-replicas`` runs without a refresh grace window.

    Under WAIT a Refresh whose rotation the replicas did not confirm in time answers
    UNAVAILABLE although the rotation happened on the primary; the client's retry with the
    same refresh token is safe only within a grace window (it gets the same successor).
    Without one the retry is reuse, and the session is revoked.
    """
    if settings.redis_wait_replicas and not settings.refresh_grace_seconds:
        log.warning(
            "--redis-wait-replicas %d without --refresh-grace-seconds: a Refresh the "
            "replicas do not confirm in time answers UNAVAILABLE after rotating, and the "
            "client's retry with the same token then counts as reuse and revokes the "
            "session; set --refresh-grace-seconds (e.g. 10) so the retry gets the same "
            "successor",
            settings.redis_wait_replicas,
        )


async def check(settings: Settings) -> None:
    """Every start-up check of :func:`tokensvc.runtime.server.start`, without serving.

    Raises:
        StartupError: Redis unusable.
        KeyRingError: a bad key-encryption key.
        ConfigError: unusable TLS files or policy.
    """
    from tokensvc.security import tls
    from tokensvc.security.policy import CallerPolicy

    url = settings.redis_url
    assert url is not None  # the parent has started the embedded Redis, if any
    CallerPolicy.for_settings(settings)
    kek = load_kek(settings.kek_file, settings.data_dir)
    previous = []
    if settings.previous_kek_file:
        previous.append(load_kek(settings.previous_kek_file, settings.data_dir))
    if not settings.insecure:
        tls.server_credentials(settings)
    redis = redis_client(url, settings.redis_timeout)
    try:
        await check_redis(redis, settings, url)
        token = pkcs11_backend(settings)
        await KeyRing(redis, kek, previous, pkcs11=token, new_keys=settings.key_backend).load()
    except StoreUnavailable as err:
        raise unavailable(err, url) from err
    finally:
        await redis.aclose()
