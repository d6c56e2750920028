"""Service configuration: defaults, then ``TOKENSVC_*`` environment, then flags.

Everything is validated once, at start-up, into a frozen :class:`Settings`. A bad value
raises :class:`ConfigError` whose message is the one line the CLI prints.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
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

__all__ = ["ConfigError", "Rate", "Settings", "add_arguments", "load", "parse_args"]


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


# flag name -> (help, type); every flag is also TOKENSVC_<NAME> in the environment.
_OPTIONS: dict[str, tuple[str, type]] = {
    "listen": ("HOST:PORT to serve gRPC on", str),
    "redis_url": ("Redis URL; omit to run an embedded Redis in --data-dir", str),
    "issuer": ("iss of every token", str),
    "audience": ("default aud (comma-separated for several)", str),
    "self_audience": (
        "tokensvc's own aud: a user's token listing its own sessions must carry it",
        str,
    ),
    "access_ttl": ("access token lifetime in seconds (cap 900)", int),
    "refresh_idle_ttl": ("refresh token idle lifetime in seconds", int),
    "family_max_age": ("absolute session (refresh family) lifetime in seconds", int),
    "jwks_max_age": ("seconds a verifier may cache the JWK Set", int),
    "leeway": ("clock skew tolerated for nbf/iat, seconds", int),
    "kek_file": ("key-encryption key (JWK JSON, kty oct); dev default in --data-dir", Path),
    "data_dir": ("directory for the embedded Redis and the development KEK", Path),
    "tls_cert": ("server certificate chain (PEM)", Path),
    "tls_key": ("server private key (PEM)", Path),
    "tls_client_ca": ("CA bundle for client certificates (enables mTLS)", Path),
    "redis_timeout": ("Redis socket timeout in seconds", float),
    "log_level": ("DEBUG, INFO, WARNING or ERROR", str),
    "workers": (
        "server processes sharing the port (SO_REUSEPORT)",
        int,
    ),
    "policy_file": ("caller policy (TOML): which mTLS identities may call each RPC", Path),
    "rate_issue": ("Issue calls per subject, COUNT/SECONDS or off", Rate),
    "rate_refresh": ("Refresh calls per peer, COUNT/SECONDS or off (+1 Redis trip)", Rate),
    "rate_introspect": ("Introspect calls per peer, COUNT/SECONDS or off (+1 Redis trip)", Rate),
    "rate_auth_failures": (
        "failed authentications per end-user session (refresh token, own token) and per "
        "peer for its own failures (policy denials), COUNT/SECONDS or off",
        Rate,
    ),
    "rate_auth_failures_relay": (
        "failed end-user authentications per relaying peer, all its users together (a "
        "flood far beyond one user), COUNT/SECONDS or off",
        Rate,
    ),
    "rate_full_catch_ups": (
        "WatchRevocations streams without a resumable position (a full catch-up: RESET and "
        "every revocation in force) per client, COUNT/SECONDS or off",
        Rate,
    ),
    "http_listen": ("HOST:PORT for the HTTP JWKS/discovery listener; off unless set", str),
    "metrics_listen": (
        "HOST:PORT for plain-HTTP /metrics alone (also on --http-listen with one worker); "
        "worker i of --workers N serves PORT+i",
        str,
    ),
    "key_rotation_interval": ("seconds between automatic signing-key rotations", int),
    "previous_kek_file": ("the KEK being replaced, still accepted for decryption", Path),
    "redis_wait_replicas": ("replicas that must acknowledge revocations (Redis WAIT)", int),
    "redis_wait_timeout": ("seconds to wait for those acknowledgements", float),
    "max_watchers_per_client": (
        "concurrent WatchRevocations streams per client (identity, or network) per process",
        int,
    ),
    "max_reflection_per_client": (
        "concurrent server-reflection streams per client (identity, else network) per process",
        int,
    ),
    "max_health_watches_per_client": (
        "concurrent grpc.health.v1 Health.Watch streams per client (identity, else network) "
        "per process",
        int,
    ),
    "max_concurrent_streams": ("concurrent calls per gRPC connection (HTTP/2 setting)", int),
    "max_connections": ("gRPC connections a process accepts at once (all clients)", int),
    "key_backend": ("where new signing keys are created: local (KEK in Redis) or pkcs11", str),
    "pkcs11_module": ("PKCS#11 module (.so) of the token holding pkcs11 signing keys", Path),
    "pkcs11_token": ("label of that token (or slot:ID)", str),
    "pkcs11_pin_file": ("file holding the token's user PIN (mode 0600; never a flag)", Path),
    "pkcs11_sessions": ("PKCS#11 operations in flight at most (sessions, threads)", int),
    "pkcs11_timeout": ("seconds to wait for a free session and for the token's answer", float),
    "trust_domain": ("the trust domain: aud of every Transaction Token", str),
    "txn_token_ttl": ("default Transaction Token lifetime, seconds", int),
    "txn_token_ttl_cap": (
        "longest Transaction Token lifetime a caller may ask for, seconds "
        f"(max {MAX_TXN_TOKEN_TTL})",
        int,
    ),
    "max_act_depth": ("most workloads in an exchanged token's act chain", int),
    "max_txn_context_bytes": (
        "largest tctx and rctx of a Transaction Token, bytes of compact JSON each",
        int,
    ),
    "refresh_grace_seconds": (
        "seconds a just-rotated refresh token may be re-presented for the same successor "
        "(lost replies; 0 = strict, max 60)",
        int,
    ),
}
_FLAGS = (
    "insecure",
    "allow_long_access_ttl",
    "allow_cn_identities",
    "audit_log_all",
    "metrics_client_ids",
    "no_uvloop",
)


_TRUE = frozenset({"1", "true", "yes", "on", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "n", ""})


def env_flag(name: str, raw: str | None) -> bool:
    """A boolean from the environment: 1/true/yes/on (true), 0/false/no/off or unset (false),
    in any case.

    Raises:
        ConfigError: any other spelling (``TOKENSVC_INSECURE=maybe`` is not silently false).
    """
    value = (raw or "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


#: ``TOKENSVC_*`` variables that are not ``serve`` settings: the CLI's transport and its
#: container probes (``TOKENSVC_HEALTH_*``), the test suite's (``TOKENSVC_TEST_*``), and what
#: Kubernetes injects for a Service named ``tokensvc`` (``TOKENSVC_SERVICE_*``,
#: ``TOKENSVC_PORT``, ``TOKENSVC_PORT_*``).
_OTHER_VARIABLES = re.compile(
    r"TOKENSVC_(TARGET|CA|CERT|KEY|HEALTH_\w+|TEST_\w+|SERVICE_\w+|PORT|PORT_\w+)"
)


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """``TOKENSVC_*`` names in ``env`` that nothing reads (a typo such as
    ``TOKENSVC_REDIS_UTL`` would otherwise be silently ignored)."""
    known = {"TOKENSVC_" + name.upper() for name in (*_OPTIONS, *_FLAGS)}
    return sorted(
        name
        for name in env
        if name.startswith("TOKENSVC_")
        and name not in known
        and not _OTHER_VARIABLES.fullmatch(name)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every setting as ``--flag`` to a parser (defaults come from :func:`load`)."""
    defaults = Settings()
    for name, (text, _kind) in _OPTIONS.items():
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            default = ",".join(default)
        if isinstance(default, Rate):
            default = str(default)
        if name == "workers":  # see _default_workers
            default = "one per CPU with TLS, 1 with --insecure or port 0"
        env = "TOKENSVC_" + name.upper()
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{text} [env {env}; default {default}]",
        )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve plaintext; loopback only [env TOKENSVC_INSECURE]",
    )
    parser.add_argument(
        "--allow-long-access-ttl",
        action="store_true",
        default=None,
        help="allow --access-ttl above 900 s [env TOKENSVC_ALLOW_LONG_ACCESS_TTL]",
    )
    parser.add_argument(
        "--allow-cn-identities",
        action="store_true",
        default=None,
        help="a client certificate without a URI SAN is identified by its common name, as "
        "cn:NAME in the policy [env TOKENSVC_ALLOW_CN_IDENTITIES]",
    )
    parser.add_argument(
        "--audit-log-all",
        action="store_true",
        default=None,
        help="also log the routine audit events issued and refreshed (one per Issue and "
        "Refresh; the audit stream always has them) [env TOKENSVC_AUDIT_LOG_ALL]",
    )
    parser.add_argument(
        "--metrics-client-ids",
        action="store_true",
        default=None,
        help="label the tokens-issued metric by client_id (one series per client) "
        "[env TOKENSVC_METRICS_CLIENT_IDS]",
    )
    parser.add_argument(
        "--no-uvloop",
        action="store_true",
        default=None,
        help="run on asyncio's own event loop, not uvloop (used where installed: Linux) "
        "[env TOKENSVC_NO_UVLOOP]",
    )
    for action in parser._actions:  # the on/off flags above are all off by default
        if action.help and action.help.endswith("]") and "default" not in action.help:
            action.help = action.help[:-1] + "; default off]"


def load(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults, environment and parsed flags, then validate.

    Raises:
        ConfigError: on any unparsable or invalid value.
    """
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for name, (_text, kind) in _OPTIONS.items():
        raw = getattr(args, name, None) if args is not None else None
        if raw is None:
            raw = env.get("TOKENSVC_" + name.upper())
        if raw is None or raw == "":
            continue
        try:
            values[name] = _convert(name, str(raw), kind)
        except ValueError:
            raise ConfigError(f"--{name.replace('_', '-')}: cannot parse {raw!r}") from None
    for name in _FLAGS:
        flag = getattr(args, name, None) if args is not None else None
        if flag is None:
            variable = "TOKENSVC_" + name.upper()
            flag = env_flag(variable, env.get(variable))
        values[name] = bool(flag)
    if "workers" not in values:
        values["workers"] = _default_workers(values)
    return Settings(**values).validate()  # type: ignore[arg-type]


def _default_workers(values: Mapping[str, object]) -> int:
    """Production (TLS) uses every core of the host; development mode, and a listener on
    port 0 (whose port the workers could not share), one process."""
    listen = str(values.get("listen", Settings().listen))
    if values.get("insecure") or listen.endswith(":0"):
        return 1
    return max(1, min(os.cpu_count() or 1, 256))


def _convert(name: str, raw: str, kind: type) -> object:
    if name == "audience":
        return tuple(a.strip() for a in raw.split(",") if a.strip())
    if kind is Path:
        return Path(raw).expanduser()
    if kind is Rate:
        return Rate.parse(raw)
    if name == "log_level" and raw.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(raw)
    return kind(raw.upper() if name == "log_level" else raw)


def parse_args(argv: Sequence[str]) -> Settings:
    """Parse ``serve`` flags (used by tests and the CLI)."""
    parser = argparse.ArgumentParser(prog="tokensvc serve")
    add_arguments(parser)
    return load(parser.parse_args(list(argv)))
