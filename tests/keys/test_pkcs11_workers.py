"""The pkcs11 key backend under ``tokensvc serve --workers 2`` (docs/key-custody.md,
Workers): a real subprocess with two workers on one port, the SoftHSM2 token of the
session, a real Redis. Each worker opens the module and its sessions itself (workers are
spawned, never forked from a process that initialised PKCS#11), signs with the key the
parent created before they started, and a planned rotation leaves exactly one new active
key that both workers sign with, and no orphan object in the token.

Which worker answered a connection is read from the per-worker metrics targets
(``--metrics-listen`` PORT and PORT+1, docs/operations.md, Scaling): calls run one
connection at a time, so the one worker whose ``tokensvc_tokens_issued_total`` moved is the
one that signed that connection's tokens.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import grpc
import jwt
import pytest
import redis

from tests.keys.conftest import SoftHsm, kid_of
from tests.support import wait_until
from tests.support.metrics import scrape
from tests.support.processes import Serve, adjacent_free_ports
from tokensvc.keys.ring_state import ACTIVE_KEY, DESTROY_KEY, RING_KEY
from tokensvc.redis.embedded import free_port
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc as pb_grpc
from tokensvc_client.verifier import KeySet, Verifier

ISSUER = "tokensvc"
CALLS = 3  # Issue calls per connection
#: connections at most until both workers have answered one (SO_REUSEPORT hashes each new
#: connection to a worker: all of 64 on one worker is a 2**-63 chance)
MAX_CONNECTIONS = 64


def _token_ids(softhsm: SoftHsm) -> set[bytes]:
    """The CKA_ID of every object in the token (through a pool of the test process)."""
    from pkcs11 import Attribute

    from tokensvc.keys.token_pool import TokenPool

    pool = TokenPool(softhsm.module, softhsm.label, None, softhsm.pin_file, 1, 5.0)

    def ids(session: Any) -> set[bytes]:
        return {bytes(obj[Attribute.ID]) for obj in session.get_objects({})}

    try:
        return asyncio.run(pool.run(ids))
    finally:
        pool.close()


class Workers:
    """A ``serve --workers 2`` with the pkcs11 backend, and calls attributed to workers."""

    def __init__(
        self, serve: Serve, grpc_port: int, metrics_port: int, in_token_before: set[bytes]
    ) -> None:
        self.serve = serve
        #: the token's object ids before the start (earlier tests share the session's token)
        self.in_token_before = in_token_before
        self.target = f"127.0.0.1:{grpc_port}"
        self.metrics_ports = (metrics_port, metrics_port + 1)

    def _issued(self) -> tuple[float, ...]:
        counts = []
        for port in self.metrics_ports:
            _, samples = scrape(port)
            counts.append(
                sum(v for (name, _), v in samples.items() if name == "tokensvc_tokens_issued_total")
            )
        return tuple(counts)

    def _channel(self) -> grpc.Channel:
        # a subchannel pool of its own: a new connection each time (gRPC's global pool may
        # hand a closing channel's connection, so the same worker, to the next channel)
        return grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])

    def issue_on_a_new_connection(self, subject: str) -> tuple[int, list[str]]:
        """CALLS Issues on a fresh connection: (the worker that answered, 0 or 1; the
        access tokens)."""
        before = self._issued()
        with self._channel() as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            tokens = [
                stub.Issue(pb.IssueRequest(subject=subject), timeout=10).tokens.access_token
                for _ in range(CALLS)
            ]
        after = self._issued()
        moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b != a]
        assert len(moved) == 1 and after[moved[0]] - before[moved[0]] == CALLS, (before, after)
        return moved[0], tokens

    def until_both_answered(self, subject: str) -> dict[int, list[str]]:
        """Issue on new connections until each worker has answered at least one."""
        by_worker: dict[int, list[str]] = {0: [], 1: []}
        for _ in range(MAX_CONNECTIONS):
            worker, tokens = self.issue_on_a_new_connection(subject)
            by_worker[worker] += tokens
            if all(by_worker.values()):
                return by_worker
        raise AssertionError(f"one worker answered all {MAX_CONNECTIONS} connections")

    def pids(self) -> list[int]:
        """The worker processes: the parent's children but multiprocessing's resource
        tracker."""
        children = subprocess.run(
            ["pgrep", "-P", str(self.serve.proc.pid)], capture_output=True, text=True
        )
        return [
            pid
            for pid in map(int, children.stdout.split())
            if "resource_tracker" not in _cmdline(pid)
        ]

    def stub_call(self, method: str, request: Any) -> Any:
        with self._channel() as channel:
            return getattr(pb_grpc.TokenServiceStub(channel), method)(request, timeout=10)


@pytest.fixture
def workers(tmp_path, redis_url, softhsm) -> Iterator[Workers]:
    grpc_port, metrics_port = free_port(), adjacent_free_ports()
    in_token_before = _token_ids(softhsm)
    # the JWK Set may be cached 1 s: a rotated key is published 1 s before it signs;
    # tokens live 60 s, so the retired key stays published for the whole test
    serve = Serve(
        "--insecure",
        "--workers",
        "2",
        "--listen",
        f"127.0.0.1:{grpc_port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--redis-url",
        redis_url,
        "--data-dir",
        str(tmp_path / "data"),
        "--issuer",
        ISSUER,
        "--rate-issue",
        "off",
        "--access-ttl",
        "60",
        "--jwks-max-age",
        "1",
        "--leeway",
        "0",
        "--key-rotation-interval",
        "3600",
        "--key-backend",
        "pkcs11",
        "--pkcs11-module",
        str(softhsm.module),
        "--pkcs11-token",
        softhsm.label,
        "--pkcs11-pin-file",
        str(softhsm.pin_file),
    )
    try:
        serve.wait_listening(count=2)
        yield Workers(serve, grpc_port, metrics_port, in_token_before)
    finally:
        code = serve.stop()
    errors = serve.errors()
    assert code == 0, errors
    assert "Traceback" not in errors
    assert softhsm.pin_file.read_text().strip() not in errors  # the PIN is never logged


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read().replace(b"\0", b" ").decode()


def _mapped(pid: int) -> str:
    """The files mapped into process ``pid`` (its loaded shared libraries)."""
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


def _ring(url: str) -> tuple[str, dict[str, dict[str, Any]], int]:
    client = redis.Redis.from_url(url)
    try:
        active = client.get(ACTIVE_KEY).decode()
        records = {k.decode(): json.loads(v) for k, v in client.hgetall(RING_KEY).items()}
        return active, records, client.hlen(DESTROY_KEY)
    finally:
        client.close()


def _verify(tokens: list[str], jwks: str) -> None:
    """Every token verifies with the published JWK Set: the client library's verifier and
    PyJWT, an independent JOSE library."""
    verifier, keys = Verifier(ISSUER, "mesh"), KeySet.from_jwks(jwks)
    published = {k["kid"]: k for k in json.loads(jwks)["keys"]}
    for token in tokens:
        assert verifier.verify(token, keys).subject
        key = jwt.PyJWK(published[kid_of(token)]).key
        claims = jwt.decode(token, key, algorithms=["ES256"], audience="mesh", issuer=ISSUER)
        assert claims["sub"]


def test_two_workers_sign_in_the_token_and_rotate_to_one_new_key(
    workers: Workers, redis_url, softhsm
):
    # workers are fresh interpreters (spawned, not forked from the parent that opened the
    # token for its start-up checks), and each has loaded the PKCS#11 module itself
    parent = workers.serve.proc.pid
    pids = workers.pids()
    assert len(pids) == 2, pids
    for pid in pids:
        assert _cmdline(pid) != _cmdline(parent)  # a bare fork runs the parent's command
        assert str(softhsm.module.resolve()) in _mapped(pid)
    # the parent created the first key before the workers started: one key in the ring,
    # one key pair in the token (no second one a worker generated and dropped)
    first, records, _ = _ring(redis_url)
    assert list(records) == [first]
    assert _token_ids(softhsm) - workers.in_token_before == {first.encode()}

    by_worker = workers.until_both_answered("before")
    assert {kid_of(t) for tokens in by_worker.values() for t in tokens} == {first}

    # a planned rotation through the admin RPC (`tokensvc keys rotate`), served by either
    ring = workers.stub_call("RotateKeys", pb.RotateKeysRequest()).keys
    (new,) = [k.kid for k in ring if k.state == "pending"]
    assert new != first
    wait_until(lambda: _ring(redis_url)[0] == new, what="the pending key promoted")

    # each worker picks the new key up from Redis and finds its object in the token
    switched: dict[int, list[str]] = {0: [], 1: []}

    def both_sign_with_new() -> bool:
        worker, tokens = workers.issue_on_a_new_connection("during")
        by_worker[worker] += tokens
        if {kid_of(t) for t in tokens} == {new}:
            switched[worker] += tokens
        return all(switched.values())

    wait_until(both_sign_with_new, 30, what="both workers to sign with the new key")
    # from now on, whichever worker answers signs with the new key only
    after = workers.until_both_answered("after")
    assert {kid_of(t) for tokens in after.values() for t in tokens} == {new}

    # exactly one active key (the new one), the old one retired; no third key was made
    active, records, to_destroy = _ring(redis_url)
    assert active == new
    assert {kid: r["state"] for kid, r in records.items()} == {first: "retired", new: "active"}
    # Redis holds no private key material: references into the token and public JWKs
    for kid, record in records.items():
        assert record["backend"] == "pkcs11" and "private" not in record
        assert "d" not in record["public"] and record["public"]["kid"] == kid
        assert record["ref"].startswith(f"pkcs11:token={softhsm.label};id={kid};")
    # the token holds the two keys' objects and nothing else new (no key a losing worker
    # generated and left behind, no temporary id)
    assert to_destroy == 0
    assert _token_ids(softhsm) - workers.in_token_before == {first.encode(), new.encode()}

    # every token of both workers verifies with the JWK Set both keys are published in
    jwks = workers.stub_call("GetKeys", pb.GetKeysRequest()).jwks
    assert {k["kid"] for k in json.loads(jwks)["keys"]} == {first, new}
    everything = [t for tokens in (*by_worker.values(), *after.values()) for t in tokens]
    assert {kid_of(t) for t in everything} == {first, new}
    _verify(everything, jwks)


def test_destroying_a_key_another_process_is_destroying_is_not_an_outage(softhsm):
    """Every worker (and replica) destroys the token objects of a deleted key on its tick:
    two may find the same objects and destroy them at once. The one that comes second
    fails on an object that is gone (SoftHSM answers CKR_OBJECT_HANDLE_INVALID while it
    lists or destroys it, CKR_FUNCTION_FAILED when both destroy at the same instant;
    whether the other destroyer is a session of this process or another process). That
    is the key gone, as wanted, not a token failure that stops the worker signing. Here
    the destroyers are concurrent sessions of one process: the same interleaving, met in
    most rounds. The sessions also prove that every session of the pool may destroy
    (a read-only one answers CKR_SESSION_READ_ONLY)."""
    from tokensvc.keys.pkcs11 import Pkcs11Backend
    from tokensvc.keys.token_pool import TokenPool

    destroyers = 8
    pool = TokenPool(softhsm.module, softhsm.label, None, softhsm.pin_file, destroyers, 10.0)
    backend = Pkcs11Backend(pool)

    async def rounds() -> list[str]:
        kids = []
        for _ in range(10):
            record = await backend.generate()
            kids.append(record["kid"])
            results = await asyncio.gather(
                *(backend.destroy(record) for _ in range(destroyers)), return_exceptions=True
            )
            assert not [r for r in results if r is not None], results
            assert backend.problem() is None
        return kids

    try:
        kids = asyncio.run(rounds())
    finally:
        pool.close()
    assert not {kid.encode() for kid in kids} & _token_ids(softhsm)  # all destroyed
