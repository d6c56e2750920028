"""Two consistency gaps closed (issue 21.5): the feed's SUBJECT event carries its watermark
to the millisecond, so a family created earlier in the watermark's second is covered even
when no SESSION event names it; and Introspect on another replica refuses a token of an
emergency-revoked key at once, not at that replica's next key-ring tick."""

from __future__ import annotations

import json
import time

import redis

from tests.support import subject_tags, wait_until
from tests.support.feed import Watcher
from tokensvc.store import sessions_key
from tokensvc_client import KeySet, RevocationSet
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Verifier, b64url_decode

Kind = pb.RevocationEvent


def _subject_event(watcher: Watcher) -> tuple[list[pb.RevocationEvent], pb.RevocationEvent]:
    events = []
    while True:
        event = watcher.next()
        if event.kind == Kind.SUBJECT:
            return events, event
        events.append(event)


def test_a_subject_event_covers_a_family_of_its_second_missing_from_the_index(tokensvc, redis_url):
    stub = tokensvc.stub()
    tags = subject_tags(tokensvc.settings)
    keys = KeySet.from_jwks(stub.GetKeys(pb.GetKeysRequest()).jwks)
    verify = Verifier("https://tokensvc.test", None).verify
    watcher = Watcher(stub)
    assert watcher.next().kind == Kind.RESET
    db = redis.Redis.from_url(redis_url)
    try:
        for attempt in range(20):  # until issue and revocation fall into the same second
            subject = f"zoe{attempt}"
            wait_until(lambda: time.time() % 1.0 < 0.5, 2, what="the start of a second")
            pair = stub.Issue(pb.IssueRequest(subject=subject)).tokens
            # the family is in force but missing from the subject's session index (an index
            # entry lost or trimmed): no SESSION event can name it
            db.zrem(sessions_key(tags.of(subject)), pair.session_id)
            stub.Revoke(pb.RevokeRequest(subject=subject))
            sessions, subject_event = _subject_event(watcher)
            assert pair.session_id not in {e.value for e in sessions}
            claims = verify(pair.access_token, keys)
            if claims.issued_at == subject_event.revoked_before.seconds:
                break
        else:
            raise AssertionError("never issued and revoked within one second")
        revoked = RevocationSet()
        revoked.apply(subject_event)
        assert revoked.is_revoked(claims)
        assert not stub.Introspect(pb.IntrospectRequest(token=pair.access_token)).active
        # a login right after, in the same second, is dated past the watermark: not refused
        again = stub.Issue(pb.IssueRequest(subject=subject)).tokens
        assert not revoked.is_revoked(verify(again.access_token, keys))
        assert stub.Introspect(pb.IntrospectRequest(token=again.access_token)).active
        rotated = stub.Refresh(pb.RefreshRequest(refresh_token=again.refresh_token)).tokens
        assert not revoked.is_revoked(verify(rotated.access_token, keys))
    finally:
        watcher.close()
        db.close()


def _kid(token: str) -> str:
    return str(json.loads(b64url_decode(token.split(".")[0]))["kid"])


def test_an_emergency_key_revocation_reaches_introspect_on_another_replica_at_once(
    make_settings, start_server
):
    settings = make_settings(key_rotation_interval=3600)
    a, b = start_server(settings), start_server(settings)
    stub_a, stub_b = a.stub(), b.stub()
    before = stub_a.Issue(pb.IssueRequest(subject="alice")).tokens.access_token
    assert stub_b.Introspect(pb.IntrospectRequest(token=before)).active
    ring = stub_a.RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True)).keys
    assert ring[0].kid != _kid(before)
    # no waiting: the replica that did not rotate sees the ring's new version in the same
    # round trip as the token's state
    assert not stub_b.Introspect(pb.IntrospectRequest(token=before)).active
    after = stub_a.Issue(pb.IssueRequest(subject="alice")).tokens.access_token
    assert stub_b.Introspect(pb.IntrospectRequest(token=after)).active
