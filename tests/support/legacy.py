"""State as the previous version (v1 families, before families v2) wrote it: its own Lua
scripts, kept verbatim in tests/support/legacy_lua/, run against the test Redis. Upgrade tests
start from this state and then talk to the current server."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from pathlib import Path

import redis

from tokensvc.store import family_key, issue_limit_key, sessions_key, subject_key

_LUA = Path(__file__).with_name("legacy_lua")


def _script(name: str, prelude: str) -> str:
    return (_LUA / f"{prelude}.lua").read_text() + (_LUA / f"{name}.lua").read_text()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def old_subject_tag(subject: str) -> str:
    """The v1 subject tag: an unsalted SHA-256 prefix of the subject."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:32]


def old_issue(redis_url: str, subject: str, *, ttl_s: int = 3600) -> tuple[str, str]:
    """A family written by the old issue.lua; returns (session id, v1 refresh token)."""
    sid = old_subject_tag(subject) + secrets.token_hex(16)
    token = f"tsr1_{sid}_{secrets.token_hex(32)}"
    now = int(time.time() * 1000)
    claims = {"sub": subject, "aud": ["mesh"], "client_id": "old-app", "roles": ["reader"]}
    tag = sid[:32]
    client = redis.Redis.from_url(redis_url)
    client.eval(
        _script("issue", "gcra"),
        4,
        family_key(sid),
        sessions_key(tag),
        subject_key(tag),
        issue_limit_key(tag),
        sid,
        _hash(token),
        now,
        now + ttl_s * 1000,
        now + ttl_s * 1000,
        subject,
        "old-app",
        "",
        json.dumps(claims, separators=(",", ":")),
        "",
        0,
        0,
    )
    return sid, token


def old_refresh(redis_url: str, token: str) -> str:
    """Rotate a v1 token with the old refresh.lua; returns its v1 successor."""
    sid = token[5:69]
    successor = f"tsr1_{sid}_{secrets.token_hex(32)}"
    now = int(time.time() * 1000)
    reply = redis.Redis.from_url(redis_url).eval(
        _script("refresh", "feed"),
        2,
        family_key(sid),
        subject_key(sid[:32]),
        _hash(token),
        _hash(successor),
        now,
        3_600_000,
        "",
        0,
        now + 60_000,
        sid,
    )
    assert reply[0] == b"ok", reply
    return successor


def old_lock(redis_url: str, subject: str) -> None:
    """LockSubject as the old revoke_subject.lua did it (under the unsalted tag)."""
    tag = old_subject_tag(subject)
    now = int(time.time() * 1000)
    redis.Redis.from_url(redis_url).eval(
        _script("revoke_subject", "feed"),
        2,
        subject_key(tag),
        sessions_key(tag),
        now,
        "phished",
        3_600_000,
        "1",
        "0",
        0,
        now + 60_000,
        subject,
    )
