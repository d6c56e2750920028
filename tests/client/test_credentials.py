"""TokenCredentials: the bearer header on outgoing calls, refreshed before expiry."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import grpc.aio
import pytest

from tests.client.conftest import METHODS
from tokensvc_client import (
    TokenClient,
    TokenCredentials,
    TokenPair,
    Unauthenticated,
    Unavailable,
    aio_channel,
    channel,
    token_call_credentials,
)


@pytest.fixture
def short_lived(make_settings, start_server):
    """A tokensvc minting 2-second access tokens."""
    return start_server(make_settings(access_ttl=2))


@pytest.mark.parametrize("server", ["sync", "aio"])
def test_calls_across_access_token_expiry_all_succeed_through_a_refresh(
    short_lived, make_protected, server
):
    protected = make_protected(short_lived, server)
    with TokenClient(short_lived.target, insecure=True) as client:
        pair = client.issue("alice", roles=["reader"])
        refreshed: list[TokenPair] = []
        creds = TokenCredentials(pair, client.refresh, on_refresh=refreshed.append)
        # plaintext loopback: gRPC local credentials, so the call credentials are sent
        with channel(
            protected.target, insecure=True, call_credentials=creds.call_credentials()
        ) as ch:
            unary = ch.unary_unary(METHODS["unary_unary"])
            seen = []
            while time.time() < pair.access_expires_at + 0.6:
                seen.append(json.loads(unary(b"x", timeout=5)))
                time.sleep(0.2)
    assert all(s["sub"] == "alice" and s["roles"] == ["reader"] for s in seen)
    assert len({s["jti"] for s in seen}) >= 2  # the access token changed during the loop
    assert refreshed and creds.tokens is refreshed[-1]
    assert creds.tokens.session_id == pair.session_id
    assert creds.tokens.access_token != pair.access_token


def test_call_credentials_on_an_asyncio_channel(tokensvc, client, make_protected):
    protected = make_protected(tokensvc, "aio")
    creds = token_call_credentials(client.issue("bob"), client.refresh)

    async def call() -> dict:
        async with aio_channel(protected.target, insecure=True, call_credentials=creds) as ch:
            return json.loads(await ch.unary_unary(METHODS["unary_unary"])(b"x", timeout=5))

    assert asyncio.run(call())["sub"] == "bob"


def test_plain_insecure_channel_does_not_send_call_credentials(tokensvc, client, make_protected):
    """gRPC refuses call credentials on a plaintext channel -- why the helpers use local
    credentials for loopback."""
    protected = make_protected(tokensvc, "sync")
    creds = token_call_credentials(client.issue("bob"), client.refresh)
    with grpc.insecure_channel(protected.target) as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary(METHODS["unary_unary"])(b"x", timeout=5, credentials=creds)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "security level" in err.value.details()
    assert protected.calls == []


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_refresh_is_due_within_the_margin_but_not_before_half_the_lifetime(client):
    pair = client.issue("alice")  # 900 s
    calls: list[str] = []

    def refresh(token: str) -> TokenPair:
        calls.append(token)
        return client.refresh(token)

    clock = Clock(pair.access_expires_at - 900)
    creds = TokenCredentials(pair, refresh, refresh_margin=60, clock=clock)
    clock.now = pair.access_expires_at - 61
    assert creds.access_token() == pair.access_token and calls == []
    clock.now = pair.access_expires_at - 59
    assert creds.access_token() != pair.access_token and calls == [pair.refresh_token]

    new = creds.tokens
    clock.now = new.access_expires_at - 900
    big_margin = TokenCredentials(new, refresh, refresh_margin=600, clock=clock)
    clock.now = new.access_expires_at - 451
    assert big_margin.access_token() == new.access_token  # capped at half the lifetime
    clock.now = new.access_expires_at - 449
    assert big_margin.access_token() != new.access_token and len(calls) == 2


def test_concurrent_callers_share_one_refresh(client):
    pair = client.issue("alice")
    calls: list[str] = []

    def slow_refresh(token: str) -> TokenPair:
        calls.append(token)
        time.sleep(0.2)
        return client.refresh(token)

    clock = Clock(pair.access_expires_at - 900)
    creds = TokenCredentials(pair, slow_refresh, clock=clock)
    clock.now = pair.access_expires_at - 10
    barrier = threading.Barrier(16)
    results: list[str] = []

    def caller() -> None:
        barrier.wait()
        results.append(creds.access_token())

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 16 and set(results) == {creds.tokens.access_token}
    assert creds.tokens.access_token != pair.access_token


def test_revoked_session_fails_calls_without_leaking_tokens(tokensvc, client, make_protected):
    protected = make_protected(tokensvc, "sync")
    pair = client.issue("alice")
    calls: list[str] = []

    def refresh(token: str) -> TokenPair:
        calls.append(token)
        return client.refresh(token)

    clock = Clock(time.time())
    creds = TokenCredentials(pair, refresh, clock=clock)
    with channel(protected.target, insecure=True, call_credentials=creds.call_credentials()) as ch:
        unary = ch.unary_unary(METHODS["unary_unary"])
        assert json.loads(unary(b"x", timeout=5))["sub"] == "alice"
        client.revoke(session_id=pair.session_id)
        clock.now = pair.access_expires_at - 1  # due: the refresh is refused
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                unary(b"x", timeout=5)
            # gRPC reports a failed call-credentials plugin as UNAVAILABLE; the refusal
            # itself is in the details
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = err.value.details()
            assert "token refresh failed" in details and "UNAUTHENTICATED" in details
            assert pair.access_token not in details and pair.refresh_token not in details
    assert len(calls) == 1  # a refused session is not refreshed again
    with pytest.raises(Unauthenticated):
        creds.access_token()


def test_transient_refresh_failure_keeps_the_valid_token_until_it_expires(client):
    pair = client.issue("alice")
    outcomes: list[Exception | None] = [Unavailable("UNAVAILABLE: down")] * 2

    def flaky(token: str) -> TokenPair:
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is not None:
            raise outcome
        return client.refresh(token)

    clock = Clock(pair.access_expires_at - 900)
    creds = TokenCredentials(pair, flaky, clock=clock)
    clock.now = pair.access_expires_at - 10
    assert creds.access_token() == pair.access_token  # refresh failed, token still valid
    assert len(outcomes) == 1
    assert creds.access_token() == pair.access_token  # backing off: no new attempt
    assert len(outcomes) == 1
    clock.now = pair.access_expires_at + 1
    with pytest.raises(Unavailable):  # expired and the refresh fails again
        creds.access_token()
    clock.now += 1
    assert creds.access_token() != pair.access_token  # the service is back
