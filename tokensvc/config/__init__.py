"""Service configuration: the frozen :class:`Settings` and what makes each value usable.

Everything is validated once, at start-up, by :meth:`Settings.validate`: the named checks
below run in order and the first bad value raises :class:`ConfigError` whose message is
the one line the CLI prints. Where the values come from is elsewhere: the flag and
variable table in :mod:`tokensvc.config.flags`, the merge of defaults, ``TOKENSVC_*``
environment and flags in :mod:`tokensvc.config.env`.

Owns: the settings and their checks (here), ``flags`` and ``env``.
May import: redis, proc, families, errors.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokensvc.errors import ConfigError
from tokensvc.redis import connection

#: Access tokens never live longer than this unless the operator overrides the cap.
ACCESS_TTL_CAP = 900
#: The longest --refresh-grace-seconds (a replay window, not a second token lifetime).
MAX_REFRESH_GRACE = 60
#: The longest --txn-token-ttl-cap: Transaction Tokens live for one request's call chain.
MAX_TXN_TOKEN_TTL = 3600
#: The deepest --max-act-depth (a verifier follows at most 16 nested act claims).
MAX_ACT_DEPTH = 16

__all__ = ["ConfigError", "Rate", "Settings", "is_loopback"]


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` calls per ``period`` seconds (GCRA: a burst of ``count``, then one every
    ``period / count`` seconds). ``count == 0`` is no limit."""

    count: int
    period: int

    @property
    def enabled(self) -> bool:
        return self.count > 0

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"COUNT/SECONDS"`` (e.g. ``"30/60"``) or ``"off"``."""
        if text.strip().lower() in ("off", "0", "none"):
            return cls(0, 1)
        count, sep, period = text.partition("/")
        if not sep or not count.strip().isdigit() or not period.strip().isdigit():
            raise ValueError(text)
        rate = cls(int(count), int(period))
        if rate.count <= 0 or not 0 < rate.period <= 86400:
            raise ValueError(text)
        return rate

    def __str__(self) -> str:
        return f"{self.count}/{self.period}" if self.enabled else "off"


@dataclass(frozen=True, slots=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    redis_url: str | None = None
    issuer: str = "https://tokensvc.local"
    audience: tuple[str, ...] = ("mesh",)
    access_ttl: int = ACCESS_TTL_CAP
    allow_long_access_ttl: bool = False
    refresh_idle_ttl: int = 14 * 86400
    family_max_age: int = 30 * 86400
    jwks_max_age: int = 300
    leeway: int = 30
    kek_file: Path | None = None
    data_dir: Path = Path(".tokensvc")
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    redis_timeout: float = 2.0
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    workers: int = 1
    policy_file: Path | None = None
    rate_issue: Rate = Rate(30, 60)
    rate_refresh: Rate = Rate(0, 1)
    rate_introspect: Rate = Rate(0, 1)
    rate_auth_failures: Rate = Rate(20, 60)
    rate_auth_failures_relay: Rate = Rate(1000, 60)
    rate_full_catch_ups: Rate = Rate(16, 64)
    http_listen: str | None = None
    metrics_listen: str | None = None
    metrics_client_ids: bool = False
    key_rotation_interval: int = 30 * 86400
    previous_kek_file: Path | None = None
    redis_wait_replicas: int = 0
    redis_wait_timeout: float = 0.5
    allow_cn_identities: bool = False
    max_watchers_per_client: int = 16
    max_reflection_per_client: int = 4
    max_health_watches_per_client: int = 16
    max_concurrent_streams: int = 100
    max_connections: int = 10_000
    self_audience: str = "tokensvc"
    audit_log_all: bool = False
    no_uvloop: bool = False  # run on asyncio's own event loop even where uvloop is installed
    refresh_grace_seconds: int = 0
    key_backend: str = "local"
    pkcs11_module: Path | None = None
    pkcs11_token: str | None = None
    pkcs11_pin_file: Path | None = None
    pkcs11_sessions: int = 4
    pkcs11_timeout: float = 2.0
    trust_domain: str = "tokensvc.local"
    txn_token_ttl: int = 60
    txn_token_ttl_cap: int = 300
    max_act_depth: int = 4
    max_txn_context_bytes: int = 1024

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    def validate(self) -> Settings:
        """Return self if every value is usable.

        Raises:
            ConfigError: naming the first bad setting.
        """
        for check in _CHECKS:
            check(self)
        return self


# -- the checks of Settings.validate, in order: each raises ConfigError naming the setting --


def _host_port(address: str) -> tuple[str, int] | None:
    """``HOST:PORT`` -> (host, port); ``None`` if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return None
    return host, int(port)


def _check_listen(s: Settings) -> None:
    if _host_port(s.listen) is None:
        raise ConfigError(f"--listen must be HOST:PORT, got {s.listen!r}")


def _check_lifetimes(s: Settings) -> None:
    for name in ("access_ttl", "refresh_idle_ttl", "family_max_age", "jwks_max_age"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    if s.access_ttl > ACCESS_TTL_CAP and not s.allow_long_access_ttl:
        raise ConfigError(
            f"--access-ttl {s.access_ttl} exceeds the {ACCESS_TTL_CAP} s cap; "
            "pass --allow-long-access-ttl to override"
        )
    if s.refresh_idle_ttl > s.family_max_age:
        raise ConfigError("--refresh-idle-ttl must not exceed --family-max-age")


def _check_workers(s: Settings) -> None:
    if not 1 <= s.workers <= 256:
        raise ConfigError("--workers must be between 1 and 256")
    if s.workers > 1 and s.port == 0:
        raise ConfigError("--workers above 1 needs a fixed --listen port (they share it)")


def _check_token_claims(s: Settings) -> None:
    if not 0 <= s.leeway <= 300:
        raise ConfigError("--leeway must be between 0 and 300 seconds")
    if not s.issuer:
        raise ConfigError("--issuer must not be empty")
    if not s.audience or not all(s.audience):
        raise ConfigError("--audience must name at least one audience")
    if not s.self_audience:
        raise ConfigError("--self-audience must not be empty")


def _check_transport(s: Settings) -> None:
    host = s.listen.rpartition(":")[0]
    if s.insecure:
        if not is_loopback(host.strip("[]")):
            raise ConfigError(f"--insecure is only allowed on a loopback address, not {host}")
    elif s.tls_cert is None or s.tls_key is None:
        raise ConfigError("TLS needs --tls-cert and --tls-key (or --insecure on loopback)")


def _check_files(s: Settings) -> None:
    files = (s.tls_cert, s.tls_key, s.tls_client_ca, s.kek_file, s.policy_file)
    for path in (*files, s.previous_kek_file):
        if path is not None and not path.is_file():
            raise ConfigError(f"file not found: {path}")


def _check_redis_url(s: Settings) -> None:
    if s.redis_url is not None:
        connection.check_url(s.redis_url)


def _check_http_listeners(s: Settings) -> None:
    for flag, address in (("http-listen", s.http_listen), ("metrics-listen", s.metrics_listen)):
        if address is None:
            continue
        parsed = _host_port(address)
        if parsed is None:
            raise ConfigError(f"--{flag} must be HOST:PORT, got {address!r}")
        host, port = parsed
        if flag == "http-listen" and s.insecure and not is_loopback(host.strip("[]")):
            raise ConfigError("--insecure serves plain HTTP JWKS on loopback only")
        if flag == "metrics-listen" and port + s.workers - 1 > 65535:
            raise ConfigError(
                f"--metrics-listen {address}: worker i serves port PORT+i, and "
                f"{port}+{s.workers - 1} is above 65535"
            )


def _check_key_rotation(s: Settings) -> None:
    if s.key_rotation_interval < 2 * (s.jwks_max_age + s.access_ttl + s.leeway):
        raise ConfigError(
            "--key-rotation-interval must be at least twice --jwks-max-age + --access-ttl "
            "+ --leeway (a key must be published before it signs and outlive its tokens)"
        )


def _check_bounds(s: Settings) -> None:
    if not 1 <= s.max_watchers_per_client <= 10_000:
        raise ConfigError("--max-watchers-per-client must be between 1 and 10000")
    if not 1 <= s.max_reflection_per_client <= 1_000:
        raise ConfigError("--max-reflection-per-client must be between 1 and 1000")
    if not 1 <= s.max_health_watches_per_client <= 10_000:
        raise ConfigError("--max-health-watches-per-client must be between 1 and 10000")
    if not 1 <= s.max_concurrent_streams <= 10_000:
        raise ConfigError("--max-concurrent-streams must be between 1 and 10000")
    if not 1 <= s.max_connections <= 1_000_000:
        raise ConfigError("--max-connections must be between 1 and 1000000")
    if not 0 <= s.redis_wait_replicas <= 16:
        raise ConfigError("--redis-wait-replicas must be between 0 and 16")
    if not 0 < s.redis_wait_timeout < s.redis_timeout:
        raise ConfigError(
            "--redis-wait-timeout must be above 0 and below --redis-timeout (WAIT blocks "
            "the connection)"
        )
    if not 0 <= s.refresh_grace_seconds <= MAX_REFRESH_GRACE:
        raise ConfigError(
            f"--refresh-grace-seconds must be between 0 (strict) and {MAX_REFRESH_GRACE}"
        )


def _check_key_backend(s: Settings) -> None:
    """--key-backend and the --pkcs11-* settings (see tokensvc.keys.pkcs11). The PIN is
    only ever read from a file: never a flag, an environment value or a log line."""
    if s.key_backend not in ("local", "pkcs11"):
        raise ConfigError("--key-backend must be local or pkcs11")
    if s.key_backend == "pkcs11" and s.pkcs11_module is None:
        raise ConfigError("--key-backend pkcs11 needs --pkcs11-module")
    if s.pkcs11_module is None:
        return
    for path in (s.pkcs11_module, s.pkcs11_pin_file):
        if path is not None and not path.is_file():
            raise ConfigError(f"file not found: {path}")
    if not s.pkcs11_token:
        raise ConfigError("--pkcs11-module needs --pkcs11-token (a token label, or slot:ID)")
    if s.pkcs11_token.startswith("slot:") and not s.pkcs11_token[5:].isdigit():
        raise ConfigError("--pkcs11-token slot:ID needs a numeric slot id")
    if s.pkcs11_pin_file is None:
        raise ConfigError("--pkcs11-module needs --pkcs11-pin-file (the user PIN, mode 0600)")
    if not 1 <= s.pkcs11_sessions <= 256:
        raise ConfigError("--pkcs11-sessions must be between 1 and 256")
    if not 0 < s.pkcs11_timeout <= 60:
        raise ConfigError("--pkcs11-timeout must be above 0 and at most 60 seconds")


def _check_call_chains(s: Settings) -> None:
    """Token exchange and Transaction Tokens (docs/call-chains.md)."""
    if not s.trust_domain or any(c.isspace() for c in s.trust_domain):
        raise ConfigError("--trust-domain must be a non-empty name without spaces")
    if not 1 <= s.txn_token_ttl_cap <= MAX_TXN_TOKEN_TTL:
        raise ConfigError(f"--txn-token-ttl-cap must be between 1 and {MAX_TXN_TOKEN_TTL} seconds")
    if not 1 <= s.txn_token_ttl <= s.txn_token_ttl_cap:
        raise ConfigError("--txn-token-ttl must be between 1 and --txn-token-ttl-cap seconds")
    if not 1 <= s.max_act_depth <= MAX_ACT_DEPTH:
        raise ConfigError(f"--max-act-depth must be between 1 and {MAX_ACT_DEPTH}")
    if not 64 <= s.max_txn_context_bytes <= 2048:
        raise ConfigError("--max-txn-context-bytes must be between 64 and 2048")


_CHECKS: tuple[Callable[[Settings], None], ...] = (
    _check_listen,
    _check_lifetimes,
    _check_workers,
    _check_token_claims,
    _check_transport,
    _check_files,
    _check_redis_url,
    _check_http_listeners,
    _check_key_rotation,
    _check_bounds,
    _check_key_backend,
    _check_call_chains,
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, no brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
