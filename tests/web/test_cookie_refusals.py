"""Refused cookies leave a trace: a session cookie that does not open (tampered, truncated,
another key's, malformed) or a cookie name sent twice is logged as a rate-limited warning
with the reason, key id and path -- never the value -- and handed to the audit hook."""

from __future__ import annotations

import logging

import pytest

from tokensvc_client import web
from tokensvc_client.web.middleware import Throttle
from tokensvc_client.web.sealing import key_id

S = "__Host-tokensvc-session"
C = "__Host-tokensvc-csrf"


def _flip(value: str, index: int) -> str:
    return value[:index] + ("A" if value[index] != "A" else "B") + value[index + 1 :]


def _cookie_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tokensvc_client.web" and r.getMessage().startswith("cookie refused")
    ]


def _cookie_refusals(w) -> list[web.CookieRefusal]:
    return [r for r in w.refusals if isinstance(r, web.CookieRefusal)]


@pytest.fixture
def alice(make_web):
    w = make_web()
    w.login("alice")
    good = w.session_cookie()
    w.client.cookies.clear()
    return w, good


def test_each_refused_session_cookie_is_logged_and_audited(alice, caplog, cookie_key):
    caplog.set_level(logging.INFO)
    w, good = alice
    kid = good.split(".")[0]
    other_key = web.generate_key()
    mine = web.CookieSealer([cookie_key])
    cases = [  # (what, value, reason, key id it names)
        ("tampered", _flip(good, len(good) // 2), "tag_mismatch", kid),
        ("tag flipped", _flip(good, -2), "tag_mismatch", kid),
        ("truncated", good[:-8], "tag_mismatch", kid),  # still base64url: the tag fails
        ("truncated to a stub", good[: len(kid) + 6], "malformed", kid),
        ("not base64url", f"{kid}.A", "malformed", kid),
        ("another key's", web.CookieSealer([other_key]).seal(S, b"{}"), "unknown_key", None),
        ("no key id", "garbage-without-a-dot", "malformed", ""),
        ("no key id it can be", "<script>alert(1)</script>.AAAA", "malformed", ""),
        ("too long", f"{kid}." + "A" * 4000, "malformed", kid),
        ("the CSRF cookie's", mine.seal(C, b"x"), "tag_mismatch", kid),
        ("ours, no session inside", mine.seal(S, b"{}"), "malformed", kid),
    ]
    for what, value, reason, named in cases:
        named = key_id(other_key) if named is None else named
        before = len(_cookie_refusals(w))
        response = w.client.get("/me", headers={"cookie": f"{S}={value}"})
        assert response.status_code == 401, what
        assert f"{S}=; Max-Age=0" in response.headers["set-cookie"], what  # cleared
        [record] = _cookie_refusals(w)[before:]
        expected = web.CookieRefusal(web.CookieReason(reason), S, named, "GET", "/me")
        assert record == expected, what
        assert value not in caplog.text, what
        body = value.partition(".")[2]
        assert len(body) < 8 or body not in caplog.text, what
    # one warning per reason (the others within the minute are held back)
    reasons = [m.split(": ")[-1].split(" ")[0] for m in _cookie_warnings(caplog)]
    assert sorted(reasons) == ["malformed", "tag_mismatch", "unknown_key"]


def test_a_warning_names_reason_key_id_and_path_never_the_value(alice, caplog):
    caplog.set_level(logging.INFO)
    w, good = alice
    bad = _flip(good, len(good) // 2)
    kid = good.split(".")[0]
    assert w.client.get("/devices", headers={"cookie": f"{S}={bad}"}).status_code == 401
    [message] = _cookie_warnings(caplog)
    assert message == f"cookie refused: {S} on GET '/devices': tag_mismatch (key id '{kid}')"
    [record] = [r for r in caplog.records if r.getMessage() == message]
    assert record.levelno == logging.WARNING
    assert bad not in caplog.text and bad.split(".")[1] not in caplog.text


def test_warnings_are_rate_limited_and_every_refusal_is_audited(alice, caplog):
    caplog.set_level(logging.INFO)
    w, good = alice
    bad = _flip(good, len(good) // 2)
    for _ in range(20):
        assert w.client.get("/me", headers={"cookie": f"{S}={bad}"}).status_code == 401
    assert len(_cookie_refusals(w)) == 20
    assert len(_cookie_warnings(caplog)) == 1  # the next one comes a minute later
    # another reason has its own warning
    w.client.get("/me", headers={"cookie": f"{S}=garbage"})
    assert [m.split(": ")[-1] for m in _cookie_warnings(caplog)][-1].startswith("malformed")
    assert len(_cookie_warnings(caplog)) == 2


def test_a_cookie_name_sent_twice_is_refused(alice, caplog):
    caplog.set_level(logging.INFO)
    w, good = alice
    header = f"{S}={good}; {C}={'A' * 43}; {S}={good}; {C}={'B' * 43}"
    assert w.client.get("/me", headers={"cookie": header}).status_code == 401
    records = _cookie_refusals(w)
    assert {(r.reason, r.cookie) for r in records} == {
        (web.CookieReason.REPEATED, S),
        (web.CookieReason.REPEATED, C),
    }
    assert good not in caplog.text and "A" * 43 not in caplog.text


def test_a_failing_audit_hook_does_not_fail_the_request(make_web, caplog):
    w = make_web()
    w.backend.audit = lambda record: 1 / 0
    response = w.client.get("/me", headers={"cookie": f"{S}=garbage"})
    assert response.status_code == 401
    assert "audit hook failed" in caplog.text


def test_throttle_lets_one_through_per_interval_and_counts_the_rest():
    now = [1000.0]
    throttle = Throttle(60.0, clock=lambda: now[0])
    assert throttle.allow("tag_mismatch") == 0
    assert [throttle.allow("tag_mismatch") for _ in range(3)] == [None, None, None]
    assert throttle.allow("malformed") == 0  # each reason on its own
    now[0] += 59.9
    assert throttle.allow("tag_mismatch") is None
    now[0] += 0.1
    assert throttle.allow("tag_mismatch") == 4  # held back since the last warning
    assert throttle.allow("tag_mismatch") is None
