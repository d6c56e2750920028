"""Where the store keeps what in Redis.

Key layout (``T`` = the subject's 128-bit tag, see :mod:`tokensvc.families.tokens`; the braces are
the Redis Cluster hash tag, so all keys of one subject share one slot)::

    ts:{T}:fam:<sid>   hash   one refresh family: state, current token hash (cur) and
                              generation (gen), its expiry, creation, last rotation,
                              absolute expiry, claims JSON (subject, client_id, ...), label
                              and cnf if set, the grace record (g) with a grace window;
                              v1 families also hold sub, cid and ``u:<hash>`` per used
                              token (see tokensvc.store.families)
    ts:{T}:sessions    zset   the subject's session ids, scored by absolute expiry
    ts:{T}:subject     hash   revoked_before (ms watermark)
    ts:{T}:jti:<jti>   string a revoked access token, expiring with the token
    ts:{T}:rl:issue    string GCRA state of the subject's Issue rate limit
    ts:{T}:fence       string short-lived write that Redis WAIT confirms (see settle())
    ts:rl:<what>:<h>   string GCRA state of a per-peer limit (h: hash of the peer identity)
    ts:revocations     stream the revocation feed (tokensvc.api.revocation_hub): one entry per
                              revoked jti, session, subject watermark (by tag), key; trimmed by age
    ts:legacy-locks    string "0" once no subject is locked under a legacy tag
    ts:{keyring}:...   the key ring (tokensvc.keys.ring); its version counter is read
                              here too (RING_VERSION)

``T`` is keyed (:class:`tokensvc.families.tokens.SubjectTags`); sessions from before keyed tags
live under their subject's legacy tag, an unsalted hash.

The subject hash also holds ``locked`` while the subject is locked (LockSubject).
"""

from __future__ import annotations

import hashlib
from typing import Final

from tokensvc.families.tokens import tag_of

REVOCATIONS: Final = "ts:revocations"
#: the audit trail (tokensvc.observe.audit)
AUDIT_STREAM: Final = "ts:audit"
#: "0" once no subject is locked under a legacy tag (see RevocationOps.find_legacy_locks)
LEGACY_LOCKS: Final = "ts:legacy-locks"
#: the key ring's version counter (tokensvc.keys.ring), read with every access token's
#: state so that Introspect sees an emergency key revocation at once
RING_VERSION: Final = "ts:{keyring}:version"


def family_key(sid: str) -> str:
    return f"ts:{{{tag_of(sid)}}}:fam:{sid}"


def sessions_key(tag: str) -> str:
    return f"ts:{{{tag}}}:sessions"


def subject_key(tag: str) -> str:
    return f"ts:{{{tag}}}:subject"


def jti_key(sid: str, jti: str) -> str:
    return f"ts:{{{tag_of(sid)}}}:jti:{jti}"


def issue_limit_key(tag: str) -> str:
    return f"ts:{{{tag}}}:rl:issue"


def peer_limit_key(what: str, peer: str) -> str:
    digest = hashlib.sha256(peer.encode("utf-8")).hexdigest()[:32]
    return f"ts:rl:{what}:{digest}"


def fence_key(key: str) -> str:
    """A key in ``key``'s hash slot (so on the same primary) for settle()'s fence write."""
    tag_start = key.find("{")
    tag_end = key.find("}", tag_start + 1)
    tag = key[tag_start + 1 : tag_end] if tag_start != -1 and tag_end > tag_start + 1 else key
    return f"ts:{{{tag}}}:fence"
