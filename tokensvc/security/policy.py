"""The caller policy: which mTLS identities may call each RPC.

A peer's identity is the SPIFFE ID of its certificate's one URI SAN or, only with
``--allow-cn-identities`` and a certificate without URI SAN, ``cn:`` + its common name
(see :mod:`tokensvc_client.peer`). Every ``allow`` entry must be ``"*"``, a valid SPIFFE
ID or ``cn:NAME``: a bare name is refused at start-up rather than silently matching
nothing. The policy file (``--policy FILE``) is TOML with one table per RPC::

    [rpc.Issue]
    allow = ["spiffe://example.org/ns/auth/sa/login"]

    [rpc.Revoke]
    allow = ["spiffe://example.org/ns/auth/sa/login", "spiffe://example.org/ns/ops/sa/admin"]

    [rpc.Introspect]
    allow = ["*"]            # "*": any peer with a verified client certificate

    [rpc.GetKeys]
    anonymous = true         # also callers without a client certificate

    [rpc.ListKeys]
    allow = ["cn:legacy-ops"]  # a common-name identity (needs --allow-cn-identities)

An RPC missing from the file keeps its default: ``GetKeys`` and ``Refresh`` open to anyone
(the refresh token is Refresh's credential), ``Introspect`` any authenticated peer,
``Issue``, ``Revoke`` and the admin RPCs (``LockSubject``, ``UnlockSubject``, ``ListKeys``,
``RotateKeys``, ``RetireKey``) nobody until listed. Health checking is always open.
Server reflection (``[rpc.ServerReflectionInfo]``, :data:`REFLECTION`) is by default open
to the admin identities (those any admin RPC admits) and to callers on a loopback address;
a table for it replaces that default. Unknown RPC names or keys are an error at start-up:
a typo must not silently open or close an RPC.

Call chains (docs/call-chains.md): ``Exchange`` and ``MintTransactionToken`` admit any
authenticated peer by default, and then do only what a table for the calling identity
allows (nothing without one; refusals are PERMISSION_DENIED, audited ``exchange_denied``)::

    [exchange."spiffe://example.org/ns/shop/sa/frontend"]
    subject_audiences = ["frontend"]  # subject tokens must be addressed to this workload
    audiences = ["orders", "billing"] # the audiences it may ask for
    roles = ["orders:read"]           # optional: the most the result may carry
    impersonate = false               # true: may ask for a result without an act claim

    [transaction_tokens."spiffe://example.org/ns/edge/sa/gateway"]
    subject_audiences = ["shop"]      # may mint from access tokens addressed to these
    scopes = ["orders.read"]          # optional: the most a minted scope may hold
    own_scopes = ["nightly.reindex"]  # may mint for itself (no user) with these scopes
    replace = true                    # may get narrowing replacements of a Txn-Token

With ``--insecure`` (no identities) these tables are not enforced, like the RPC rules;
the narrowing rules (role and scope subsets, expiry, act depth) always hold.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokensvc.config import ConfigError, Settings
from tokensvc_client.peer import CN_PREFIX, Peer, is_identity

ANY_AUTHENTICATED = "*"


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one RPC."""

    allow: frozenset[str] = frozenset()
    anonymous: bool = False

    def admits(self, peer: Peer) -> bool:
        if not peer.authenticated:
            return self.anonymous
        return self.anonymous or ANY_AUTHENTICATED in self.allow or peer.identity in self.allow


DEFAULT_RULES: Mapping[str, Rule] = {
    "GetKeys": Rule(anonymous=True),
    "Refresh": Rule(anonymous=True),
    "Introspect": Rule(frozenset({ANY_AUTHENTICATED})),
    "Issue": Rule(),
    "Revoke": Rule(),
    "LockSubject": Rule(),
    "UnlockSubject": Rule(),
    "ListKeys": Rule(),
    "RotateKeys": Rule(),
    "RetireKey": Rule(),
    "ListSessions": Rule(),  # or the subject itself, with its own token (tokensvc.api.sessions)
    "WatchRevocations": Rule(frozenset({ANY_AUTHENTICATED})),
    "ServerReflectionInfo": Rule(),  # by default: see CallerPolicy.admits_reflection
    # the [exchange.*] and [transaction_tokens.*] tables decide what each caller may do
    "Exchange": Rule(frozenset({ANY_AUTHENTICATED})),
    "MintTransactionToken": Rule(frozenset({ANY_AUTHENTICATED})),
}
#: The reflection service's one RPC (grpc.reflection.v1alpha.ServerReflection).
REFLECTION = "ServerReflectionInfo"
#: The admin RPCs: whom they admit may also use reflection by default.
ADMIN_RPCS = ("LockSubject", "UnlockSubject", "ListKeys", "RotateKeys", "RetireKey")


@dataclass(frozen=True, slots=True)
class ExchangeRule:
    """What one workload may get from ``Exchange`` (a ``[exchange."ID"]`` table)."""

    #: the subject token must be addressed to one of these (tokens this workload received)
    subject_audiences: frozenset[str]
    #: the audiences it may ask for
    audiences: frozenset[str]
    #: the most the result may carry (None: whatever the subject token has)
    roles: frozenset[str] | None = None
    #: may ask for a result without an ``act`` claim naming it
    impersonate: bool = False


@dataclass(frozen=True, slots=True)
class TransactionRule:
    """What one workload may get from ``MintTransactionToken`` (a
    ``[transaction_tokens."ID"]`` table)."""

    #: may mint from access tokens addressed to one of these (empty: not from access tokens)
    subject_audiences: frozenset[str] = frozenset()
    #: the most a scope minted from an access token may hold (None: its roles)
    scopes: frozenset[str] | None = None
    #: may mint for itself, with these scopes at most (empty: not for itself)
    own_scopes: frozenset[str] = frozenset()
    #: may get (narrowing) replacements of Transaction Tokens
    replace: bool = False


@dataclass(frozen=True)
class CallerPolicy:
    """Rules by RPC name (the method name without the service, e.g. ``"Issue"``)."""

    rules: Mapping[str, Rule]
    #: RPCs the policy file lists (the others keep their defaults)
    listed: frozenset[str] = frozenset()
    #: ``[exchange."ID"]`` tables by identity
    exchange: Mapping[str, ExchangeRule] = field(default_factory=dict)
    #: ``[transaction_tokens."ID"]`` tables by identity
    transaction_tokens: Mapping[str, TransactionRule] = field(default_factory=dict)

    @classmethod
    def default(cls) -> CallerPolicy:
        return cls(dict(DEFAULT_RULES))

    @classmethod
    def from_toml(cls, text: str, source: str = "policy") -> CallerPolicy:
        """Parse a policy document.

        Raises:
            ConfigError: invalid TOML, an unknown RPC or key, a wrongly typed value.
        """
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML: {err}") from None
        unknown = set(doc) - {"rpc", "exchange", "transaction_tokens"}
        if unknown:
            raise ConfigError(
                f"{source}: unknown table(s) {sorted(unknown)}; expected [rpc.NAME], "
                '[exchange."ID"] or [transaction_tokens."ID"]'
            )
        rules = dict(DEFAULT_RULES)
        tables = doc.get("rpc", {})
        if not isinstance(tables, dict):
            raise ConfigError(f"{source}: rpc must be a table of [rpc.NAME] tables")
        for name, table in tables.items():
            if name not in DEFAULT_RULES:
                raise ConfigError(
                    f"{source}: unknown RPC {name!r}; known: {', '.join(sorted(DEFAULT_RULES))}"
                )
            rules[name] = _rule(f"{source}: [rpc.{name}]", table)
        exchange = {
            identity: _exchange_rule(f'{source}: [exchange."{identity}"]', table)
            for identity, table in _identity_tables(source, "exchange", doc).items()
        }
        minting = {
            identity: _transaction_rule(f'{source}: [transaction_tokens."{identity}"]', table)
            for identity, table in _identity_tables(source, "transaction_tokens", doc).items()
        }
        return cls(rules, frozenset(tables), exchange, minting)

    @classmethod
    def from_file(cls, path: Path) -> CallerPolicy:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--policy-file {path}: {err}") from None
        return cls.from_toml(text, str(path))

    @classmethod
    def for_settings(cls, settings: Settings) -> CallerPolicy:
        """The policy of ``--policy-file`` (else the defaults), checked against the settings.

        Raises:
            ConfigError: as :meth:`from_toml`, or ``cn:`` identities listed while
                ``--allow-cn-identities`` is off (they could never match).
        """
        policy = cls.from_file(settings.policy_file) if settings.policy_file else cls.default()
        if policy.common_names and not settings.allow_cn_identities:
            raise ConfigError(
                f"{settings.policy_file}: lists common-name identities "
                f"({', '.join(policy.common_names)}) but --allow-cn-identities is off"
            )
        return policy

    def admits(self, rpc: str, peer: Peer) -> bool:
        rule = self.rules.get(rpc)
        return rule is not None and rule.admits(peer)

    def admits_reflection(self, peer: Peer, loopback: bool) -> bool:
        """Whether ``peer`` (calling from a loopback address or not) may use reflection:
        as ``[rpc.ServerReflectionInfo]`` says, else if it is an admin identity or local."""
        if REFLECTION in self.listed:
            return self.admits(REFLECTION, peer)
        return loopback or any(self.admits(rpc, peer) for rpc in ADMIN_RPCS)

    @property
    def common_names(self) -> list[str]:
        """The ``cn:NAME`` identities the policy lists (sorted)."""
        names = {name for rule in self.rules.values() for name in rule.allow}
        names.update(self.exchange, self.transaction_tokens)
        return sorted(name for name in names if name.startswith(CN_PREFIX))


def _rule(where: str, table: Any) -> Rule:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - {"allow", "anonymous"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected allow, anonymous")
    allow = table.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) and a for a in allow):
        raise ConfigError(f"{where}: allow must be a list of non-empty identity strings")
    for entry in allow:
        if entry != ANY_AUTHENTICATED and not is_identity(entry):
            raise ConfigError(
                f"{where}: {entry!r} is not an identity: write a SPIFFE ID "
                f'(spiffe://trust.domain/path), cn:NAME for a common name, or "*"'
            )
    anonymous = table.get("anonymous", False)
    if not isinstance(anonymous, bool):
        raise ConfigError(f"{where}: anonymous must be true or false")
    return Rule(frozenset(allow), anonymous)


def _identity_tables(source: str, kind: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    tables = doc.get(kind, {})
    if not isinstance(tables, dict):
        raise ConfigError(f'{source}: {kind} must be a table of [{kind}."ID"] tables')
    for identity in tables:
        if not is_identity(identity):
            raise ConfigError(
                f"{source}: [{kind}.{identity!r}] does not name an identity: write a SPIFFE "
                "ID (quoted) or cn:NAME"
            )
    return tables


def _names(where: str, table: Mapping[str, Any], key: str, *, required: bool) -> frozenset[str]:
    value = table.get(key)
    if value is None and not required:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: {key} must be a list of non-empty strings")
    if required and not value:
        raise ConfigError(f"{where}: {key} must name at least one")
    return frozenset(value)


def _flag(where: str, table: Mapping[str, Any], key: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false")
    return value


def _known_keys(where: str, table: Any, keys: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - keys
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected {', '.join(sorted(keys))}"
        )
    return table


_EXCHANGE_KEYS = frozenset({"subject_audiences", "audiences", "roles", "impersonate"})
_TRANSACTION_KEYS = frozenset({"subject_audiences", "scopes", "own_scopes", "replace"})


def _exchange_rule(where: str, table: Any) -> ExchangeRule:
    table = _known_keys(where, table, _EXCHANGE_KEYS)
    return ExchangeRule(
        subject_audiences=_names(where, table, "subject_audiences", required=True),
        audiences=_names(where, table, "audiences", required=True),
        roles=_names(where, table, "roles", required=False) if "roles" in table else None,
        impersonate=_flag(where, table, "impersonate"),
    )


def _transaction_rule(where: str, table: Any) -> TransactionRule:
    table = _known_keys(where, table, _TRANSACTION_KEYS)
    rule = TransactionRule(
        subject_audiences=_names(where, table, "subject_audiences", required=False),
        scopes=_names(where, table, "scopes", required=False) if "scopes" in table else None,
        own_scopes=_names(where, table, "own_scopes", required=False),
        replace=_flag(where, table, "replace"),
    )
    if not (rule.subject_audiences or rule.own_scopes or rule.replace):
        raise ConfigError(f"{where}: allows nothing: set subject_audiences, own_scopes or replace")
    return rule
