"""Keyed subject tags (issue 10.4): session ids and the revocation feed carry nothing from
which a subject can be guessed; interceptors match subject revocations through the token's
``sid``; sessions and locks written under the old unsalted tags keep working."""

from __future__ import annotations

import time

import grpc
import pytest

from tests.support import subject_tags
from tests.support.legacy import old_issue, old_lock, old_subject_tag
from tokensvc_client import KeySet, RevocationSet
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.verifier import Verifier

Kind = pb.RevocationEvent


def _events_until_subject(stub, revoke) -> list[pb.RevocationEvent]:
    feed = stub.WatchRevocations(pb.WatchRevocationsRequest(), timeout=10)
    assert next(feed).kind == Kind.RESET
    revoke()
    events = []
    for event in feed:
        events.append(event)
        if event.kind == Kind.SUBJECT:
            break
    feed.cancel()
    return events


def test_session_ids_and_the_feed_name_subjects_only_by_a_keyed_tag(tokensvc):
    stub = tokensvc.stub()
    tags = subject_tags(tokensvc.settings)
    before = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    assert before.session_id[:32] == tags.of("alice") != old_subject_tag("alice")
    time.sleep(1.05)  # the watermark is whole seconds: a token of the second before it
    events = _events_until_subject(stub, lambda: stub.Revoke(pb.RevokeRequest(subject="alice")))
    values = [e.value for e in events]
    assert not [v for v in values if "alice" in v or old_subject_tag("alice") in v]
    assert events[-1].value == before.session_id[:32]

    # an interceptor's revocation set matches the SUBJECT event through the token's sid
    keys = KeySet.from_jwks(stub.GetKeys(pb.GetKeysRequest()).jwks)
    verify = Verifier("https://tokensvc.test", None).verify
    revoked = RevocationSet()
    revoked.apply(events[-1])  # the SUBJECT event alone
    assert revoked.is_revoked(verify(before.access_token, keys))
    after = stub.Issue(pb.IssueRequest(subject="alice")).tokens
    assert not revoked.is_revoked(verify(after.access_token, keys))


def test_sessions_under_the_old_unsalted_tag_stay_listed_and_revocable(stub, redis_url):
    old_sid, old_token = old_issue(redis_url, "mallory")
    new = stub.Issue(pb.IssueRequest(subject="mallory")).tokens
    listed = stub.ListSessions(pb.ListSessionsRequest(subject="mallory")).sessions
    assert {s.session_id for s in listed} == {old_sid, new.session_id}

    revoke = pb.RevokeRequest(subject="mallory")
    answers = []
    events = _events_until_subject(stub, lambda: answers.append(stub.Revoke(revoke)))
    assert answers[0].revoked_sessions == 2
    # the old session is announced by its id, the subject only by its keyed tag
    assert (Kind.SESSION, old_sid) in [(e.kind, e.value) for e in events]
    assert [e.value for e in events if e.kind == Kind.SUBJECT] == [new.session_id[:32]]
    for token in (old_token, new.refresh_token):
        assert not stub.Introspect(pb.IntrospectRequest(token=token)).active
        with pytest.raises(grpc.RpcError) as err:
            stub.Refresh(pb.RefreshRequest(refresh_token=token))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details() == "revoked"


def test_a_lock_written_by_the_previous_version_still_refuses_issue(
    make_settings, start_server, redis_url
):
    old_lock(redis_url, "oscar")  # before the upgraded server starts
    stub = start_server(make_settings()).stub()
    with pytest.raises(grpc.RpcError) as err:
        stub.Issue(pb.IssueRequest(subject="oscar"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.Issue(pb.IssueRequest(subject="peggy")).tokens  # only oscar
    assert stub.UnlockSubject(pb.UnlockSubjectRequest(subject="oscar")).was_locked
    assert stub.Issue(pb.IssueRequest(subject="oscar")).tokens
