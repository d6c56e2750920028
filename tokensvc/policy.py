"""The caller policy: which mTLS identities may call each RPC.

A peer's identity is its SPIFFE ID or, without one, its certificate's common name (see
:mod:`tokensvc_client.peer`). The policy file (``--policy FILE``) is TOML with one table
per RPC::

    [rpc.Issue]
    allow = ["spiffe://example.org/ns/auth/sa/login"]

    [rpc.Revoke]
    allow = ["spiffe://example.org/ns/auth/sa/login", "spiffe://example.org/ns/ops/sa/admin"]

    [rpc.Introspect]
    allow = ["*"]            # "*": any peer with a verified client certificate

    [rpc.GetKeys]
    anonymous = true         # also callers without a client certificate

An RPC missing from the file keeps its default: ``GetKeys`` and ``Refresh`` open to anyone
(the refresh token is Refresh's credential), ``Introspect`` any authenticated peer,
``Issue``, ``Revoke`` and the admin RPCs (``LockSubject``, ``UnlockSubject``, ``ListKeys``,
``RotateKeys``, ``RetireKey``) nobody until listed. Health
checking and reflection are separate services and always open. Unknown RPC names or keys
are an error at start-up: a typo must not silently open or close an RPC.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokensvc.config import ConfigError
from tokensvc_client.peer import Peer

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
    "ListSessions": Rule(),  # or the subject itself, with its own token (tokensvc.sessions)
    "WatchRevocations": Rule(frozenset({ANY_AUTHENTICATED})),
}


@dataclass(frozen=True)
class CallerPolicy:
    """Rules by RPC name (the method name without the service, e.g. ``"Issue"``)."""

    rules: Mapping[str, Rule]

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
        unknown = set(doc) - {"rpc"}
        if unknown:
            raise ConfigError(f"{source}: unknown table(s) {sorted(unknown)}; expected [rpc.NAME]")
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
        return cls(rules)

    @classmethod
    def from_file(cls, path: Path) -> CallerPolicy:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--policy-file {path}: {err}") from None
        return cls.from_toml(text, str(path))

    def admits(self, rpc: str, peer: Peer) -> bool:
        rule = self.rules.get(rpc)
        return rule is not None and rule.admits(peer)


def _rule(where: str, table: Any) -> Rule:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - {"allow", "anonymous"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected allow, anonymous")
    allow = table.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) and a for a in allow):
        raise ConfigError(f"{where}: allow must be a list of non-empty identity strings")
    anonymous = table.get("anonymous", False)
    if not isinstance(anonymous, bool):
        raise ConfigError(f"{where}: anonymous must be true or false")
    return Rule(frozenset(allow), anonymous)
