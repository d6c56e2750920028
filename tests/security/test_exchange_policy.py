"""The exchange and transaction-token tables of the caller policy (docs/call-chains.md):
parsed strictly, a typo stops the start."""

from __future__ import annotations

import pytest

from tokensvc.config import ConfigError
from tokensvc.config.env import parse_args
from tokensvc.security.policy import CallerPolicy, ExchangeRule, TransactionRule

EDGE = "spiffe://tokensvc.test/ns/edge/sa/gateway"


def test_tables_by_identity():
    policy = CallerPolicy.from_toml(
        f'[exchange."{EDGE}"]\nsubject_audiences = ["shop"]\naudiences = ["orders"]\n'
        'roles = ["r"]\nimpersonate = true\n'
        f'[transaction_tokens."{EDGE}"]\nsubject_audiences = ["shop"]\nreplace = true\n'
    )
    assert policy.exchange == {
        EDGE: ExchangeRule(frozenset({"shop"}), frozenset({"orders"}), frozenset({"r"}), True)
    }
    assert policy.transaction_tokens == {
        EDGE: TransactionRule(subject_audiences=frozenset({"shop"}), replace=True)
    }
    # no cap on roles unless listed; Exchange admits any authenticated peer at the RPC level
    bare = CallerPolicy.from_toml(
        f'[exchange."{EDGE}"]\nsubject_audiences = ["a"]\naudiences = ["b"]\n'
    )
    assert bare.exchange[EDGE].roles is None and not bare.exchange[EDGE].impersonate
    assert ANY in bare.rules["Exchange"].allow and ANY in bare.rules["MintTransactionToken"].allow


ANY = "*"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('[exchange.gateway]\naudiences = ["b"]\n', "does not name an identity"),
        (f'[exchange."{EDGE}"]\naudiences = ["b"]\n', "subject_audiences must be a list"),
        (f'[exchange."{EDGE}"]\nsubject_audiences = ["a"]\naudiences = []\n', "at least one"),
        (
            f'[exchange."{EDGE}"]\nsubject_audiences = ["a"]\naudiences = ["b"]\nimpersonate = 1\n',
            "true or false",
        ),
        (f'[exchange."{EDGE}"]\nsubject_audience = ["a"]\n', "unknown key"),
        (f'[transaction_tokens."{EDGE}"]\nreplace = false\n', "allows nothing"),
        (f'[transaction_tokens."{EDGE}"]\nscopes = "x"\nreplace = true\n', "list of non-empty"),
        ('[txn_tokens."x"]\nreplace = true\n', "unknown table"),
    ],
)
def test_mistakes_stop_the_start(text, complaint):
    with pytest.raises(ConfigError, match=complaint):
        CallerPolicy.from_toml(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trust-domain", "a b"], "--trust-domain"),
        (["--txn-token-ttl", "0"], "--txn-token-ttl must"),
        (["--txn-token-ttl", "400"], "--txn-token-ttl must"),  # above the default cap 300
        (["--txn-token-ttl-cap", "3601"], "--txn-token-ttl-cap"),
        (["--max-act-depth", "17"], "--max-act-depth"),
        (["--max-txn-context-bytes", "10"], "--max-txn-context-bytes"),
    ],
)
def test_call_chain_settings_are_checked_at_start(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(["--insecure", *argv])
    settings = parse_args(["--insecure", "--trust-domain", "example.org", "--max-act-depth", "2"])
    assert settings.trust_domain == "example.org" and settings.max_act_depth == 2
