"""The family store: refresh families, revocations and rate limits in Redis.

One class, :class:`FamilyStore`, built from one part per concern: :mod:`.families`
(Issue, Refresh, Introspect, ListSessions), :mod:`.revocations` (jti, session, subject
and key revocations with their feed events), :mod:`.ratelimits` (GCRA limiters), on
:mod:`.core` (connection, scripts, feed append, replica confirmation). :mod:`.keyspace`
documents the Redis key layout; the Lua scripts they run live in ``lua/`` beside them;
:mod:`.calls` maps Redis failures to :class:`StoreUnavailable`.
Callers import everything from here.

May import: redis, proc, families, errors.
"""

from __future__ import annotations

from tokensvc.store.calls import (
    StoreUnavailable,
    call_deadline,
    enter_deadline,
    guarded,
    leave_deadline,
    text,
)
from tokensvc.store.families import (
    AccessState,
    FamilyOps,
    IssueOutcome,
    IssueStatus,
    NewFamily,
    Presented,
    RefreshStatus,
    Rotation,
    SessionInfo,
    Successor,
)
from tokensvc.store.keyspace import (
    REVOCATIONS,
    family_key,
    issue_limit_key,
    jti_key,
    peer_limit_key,
    sessions_key,
    subject_key,
)
from tokensvc.store.ratelimits import Limit, LimitOps
from tokensvc.store.revocations import RevocationOps, revocations_in_force

__all__ = [
    "REVOCATIONS",
    "AccessState",
    "FamilyStore",
    "IssueOutcome",
    "IssueStatus",
    "Limit",
    "NewFamily",
    "Presented",
    "RefreshStatus",
    "Rotation",
    "SessionInfo",
    "StoreUnavailable",
    "Successor",
    "call_deadline",
    "enter_deadline",
    "family_key",
    "guarded",
    "issue_limit_key",
    "jti_key",
    "leave_deadline",
    "peer_limit_key",
    "revocations_in_force",
    "sessions_key",
    "subject_key",
    "text",
]


class FamilyStore(FamilyOps, RevocationOps, LimitOps):
    """Refresh families and revocation state, each operation one Redis round trip.

    Every revocation is also appended to the revocation stream (:data:`REVOCATIONS`):
    inside the revoking script on a single Redis or Sentinel group (atomic with the
    revocation), right after it on Redis Cluster, where the stream is in another slot (a
    crash between the two then loses the event, not the revocation: Refresh and Introspect
    still enforce it; interceptors learn of it when the token expires). ``feed_ttl_ms``:
    how long an event matters (longest access-token lifetime + leeway).
    """
