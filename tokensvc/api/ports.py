"""The narrow collaborators the RPC groups receive: each group names the part of the family
store it uses (as fosite's handlers name their storage interfaces), so a test can hand it a
small fake of exactly that. :class:`tokensvc.store.FamilyStore` satisfies every protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeAlias

from tokensvc.store import (
    AccessState,
    IssueOutcome,
    Limit,
    NewFamily,
    Presented,
    Rotation,
    SessionInfo,
    Successor,
)

#: UNIX time in seconds (``time.time``; tests give a replica a skewed one).
Clock: TypeAlias = Callable[[], float]


class Rotations(Protocol):
    """Refresh: one rotation of a family."""

    async def rotate(
        self,
        sid: str,
        presented: Presented,
        successor: Successor,
        now_ms: int,
        idle_ttl_ms: int,
        thumbprint: str = "",
        grace_ms: int = 0,
    ) -> Rotation: ...


class SessionReads(Protocol):
    """ListSessions: a subject's sessions, and whether an access token's session is live."""

    async def access_state(self, sid: str, jti: str, now_ms: int) -> AccessState: ...

    async def list_sessions(
        self, tags: tuple[str, ...], now_ms: int, limit: int = 500
    ) -> list[SessionInfo]: ...


class SubjectRevocations(Protocol):
    """Revoke by subject, lock and unlock a subject."""

    async def revoke_subject(
        self,
        tag: str,
        legacy_tag: str,
        now_ms: int,
        reason: str,
        watermark_ttl_ms: int,
        *,
        lock: bool = False,
    ) -> int: ...

    async def unlock_subject(self, tag: str, legacy_tag: str, watermark_ttl_ms: int) -> bool: ...


class KeyRevocations(Protocol):
    """Key administration: announce removed keys, wait for replicas to have a write."""

    async def settle(self, key: str) -> None: ...

    async def revoke_keys(self, kids: list[str], now_ms: int) -> None: ...


class AdminStore(SubjectRevocations, KeyRevocations, Protocol):
    """What the administrative RPCs use."""


class TokenStore(SubjectRevocations, Protocol):
    """Issue, Revoke and Introspect: create families, revoke them, read their state."""

    async def create(
        self, family: NewFamily, limit: Limit = ..., legacy_tag: str = ""
    ) -> IssueOutcome: ...

    async def revoke_sessions(
        self,
        sids: list[str],
        now_ms: int,
        reason: str,
        token_hash: str | None = None,
        generation: int = 0,
    ) -> int: ...

    async def revoke_jti(self, sid: str, jti: str, expires_at_s: int, now_ms: int) -> None: ...

    async def refresh_state(
        self, sid: str, token_hash: str, now_ms: int
    ) -> dict[str, str] | None: ...

    async def access_state(self, sid: str, jti: str, now_ms: int) -> AccessState: ...
