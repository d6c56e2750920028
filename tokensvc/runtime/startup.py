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
    reason = f": {err.__cause__}" if err.__cause__ else ""
    return StartupError(f"{err} at {where(url)}{reason}")


async def check_redis(redis: RedisClient, settings: Settings, url: str) -> None:
    """Prove ``url`` is a reachable Redis; warn loudly when it has fewer replicas than
    ``--redis-wait-replicas`` needs.

    Without them every Revoke and LockSubject fails UNAVAILABLE (the revocation is in
    force on the primary, but not confirmed). That is a warning, not a refusal to start:
    a replica restarting during Redis maintenance must not turn into a tokensvc outage,
    and Revokes succeed again as soon as the replicas are back.

    Raises:
        StartupError: naming the address and the reason.
    """
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
            "replica(s): every Revoke and LockSubject fails UNAVAILABLE until enough "
            "replicas are connected; set it to at most the replicas you run (0 without "
            "replication)",
            wanted,
            where(url),
            have,
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
