"""The ``serve`` flags: one row per setting (help text and type), each also a
``TOKENSVC_<NAME>`` environment variable, and their argparse definitions.

:mod:`tokensvc.config.env` reads the same table to take the values from the environment;
docs/configuration.md lists every flag (tests/repo/test_docs.py compares the two).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokensvc.config import MAX_TXN_TOKEN_TTL, Rate, Settings

__all__ = ["FLAGS", "OPTIONS", "add_arguments"]

# flag name -> (help, type); every flag is also TOKENSVC_<NAME> in the environment.
OPTIONS: dict[str, tuple[str, type]] = {
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
FLAGS = (
    "insecure",
    "allow_long_access_ttl",
    "allow_cn_identities",
    "audit_log_all",
    "metrics_client_ids",
    "no_uvloop",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every setting as ``--flag`` to a parser (defaults come from :func:`load`)."""
    defaults = Settings()
    for name, (text, _kind) in OPTIONS.items():
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            default = ",".join(default)
        if isinstance(default, Rate):
            default = str(default)
        if name == "workers":  # see env._default_workers
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
        help="also log the routine audit events issued, refreshed, exchanged and "
        "txn_token_minted (one per Issue, Refresh, Exchange and MintTransactionToken; the "
        "audit stream always has them) [env TOKENSVC_AUDIT_LOG_ALL]",
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
