"""Emergency rotation at the interceptor: with the revocation feed, tokens of the new key
verify within a second of ``RotateKeys(now, revoke_old)`` (the feed's KEY event makes the
JWKS cache refetch), while a flood of key events cannot make it hammer GetKeys."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import pytest

from tests.client.conftest import Protected, bearer, refusal
from tests.support import ServerThread, wait_until
from tests.support.feed import PROPAGATION_BOUND, Feed
from tokensvc_client import Jwks, JwksCache, TokenClient
from tokensvc_client.jwks import KEY_EVENT_INTERVAL, KeyRequest
from tokensvc_client.v1 import tokensvc_pb2 as pb


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_tokens_of_the_new_key_verify_within_a_second_of_an_emergency_rotation(
    kind: str,
    tokensvc: ServerThread,
    make_protected: Callable[..., Protected],
    make_feed: Callable[..., Feed],
    client: TokenClient,
) -> None:
    feed = make_feed(tokensvc.target, kind)
    assert feed.wait_connected()
    # the default unknown-kid refetch interval (30 s) is what would lock out the new key
    protected = make_protected(tokensvc, kind, revocation_check=feed.feed)
    assert refusal(protected, client.issue("gina").access_token) is None  # keys cached
    fetches = len(protected.fetches)
    tokensvc.stub().RotateKeys(pb.RotateKeysRequest(now=True, revoke_old=True))
    rotated = time.monotonic()
    fresh = client.issue("gina").access_token  # signed by the new key

    def accepted() -> bool:
        err = refusal(protected, fresh)
        assert err is None or err.details() == "invalid token: unknown_key", err.details()
        return err is None

    wait_until(accepted, PROPAGATION_BOUND, what="the new key accepted")
    took = time.monotonic() - rotated
    print(f"\n[{kind}] emergency rotation -> new key accepted in {took * 1000:.0f} ms")
    assert len(protected.fetches) - fetches <= 3  # a refetch or two, not one per call
    assert protected.call("unary_unary", bearer(fresh))[0]["sub"] == "gina"


def test_a_flood_of_key_events_costs_at_most_four_fetches_a_second(client: TokenClient) -> None:
    now = [1000.0]
    fetched: list[float] = []

    def fetch() -> Jwks:
        fetched.append(now[0])
        return client.get_keys()

    cache = JwksCache(fetch, clock=lambda: now[0])
    keys = cache.load()
    for _ in range(2000):  # 2 s of events, one every millisecond, each followed by calls
        now[0] += 0.001
        cache.key_event()
        cache.answer()
        cache.answer(KeyRequest(lacking=cache.cached()))  # a token with an unknown kid
    assert cache.cached() is not None and len(keys) >= 1
    assert 2 <= len(fetched) - 1 <= 2 / KEY_EVENT_INTERVAL + 1
    gaps = [b - a for a, b in itertools.pairwise(fetched[1:])]
    assert all(gap >= KEY_EVENT_INTERVAL - 1e-9 for gap in gaps)
