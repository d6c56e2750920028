"""WatchRevocations answers a resume id ahead of the feed -- a valid id the feed never
issued -- with RESET and the full set, as it answers an unknown (too old) position, instead
of a stream that stays silent until the feed passes that id; live events follow.

Real Redis, real gRPC.
"""

from __future__ import annotations

import pytest

from tests.support.feed import Watcher
from tokensvc_client.v1 import tokensvc_pb2 as pb

Kind = pb.RevocationEvent
U64_MAX = 18446744073709551615


def _revoke(stub) -> str:
    sid: str = stub.Issue(pb.IssueRequest(subject="alice")).tokens.session_id
    stub.Revoke(pb.RevokeRequest(session_id=sid))
    return sid


@pytest.mark.parametrize("ahead", ["max", "next"])
def test_a_resume_id_ahead_of_the_feed_gets_reset_and_the_full_set(tokensvc, stub, ahead):
    first = _revoke(stub)
    probe = Watcher(stub)
    try:
        reset, event = probe.take(2)
    finally:
        probe.close()
    assert reset.kind == Kind.RESET and event.value == first
    ms, seq = (int(part) for part in event.id.split("-"))
    resume_from = f"{U64_MAX}-{U64_MAX}" if ahead == "max" else f"{ms}-{seq + 1}"
    watcher = Watcher(stub, resume_from=resume_from)
    try:
        answered = watcher.take(2)
        assert [e.kind for e in answered] == [Kind.RESET, Kind.SESSION]
        assert answered[1].value == first
        # and it is a live stream from there: the next revocation arrives
        second = _revoke(stub)
        assert watcher.next().value == second
        assert watcher.error is None
    finally:
        watcher.close()


def test_a_resume_id_the_feed_has_issued_still_resumes(tokensvc, stub):
    first, second = _revoke(stub), _revoke(stub)
    probe = Watcher(stub)
    try:
        events = probe.take(3)
    finally:
        probe.close()
    assert [e.value for e in events[1:]] == [first, second]
    watcher = Watcher(stub, resume_from=events[1].id)
    try:
        third = _revoke(stub)
        # no RESET: resumed after ``first``
        assert [e.value for e in watcher.take(2)] == [second, third]
    finally:
        watcher.close()
