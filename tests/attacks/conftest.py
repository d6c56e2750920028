"""Fixtures of the attack suite.

One service for the whole package: the cases are many and only read, so a server per case
would cost seconds for nothing. Its real signing key is loaded from the test Redis with the
KEK the server uses -- the same path a second replica takes -- so forged tokens can be
otherwise perfectly valid.

Likewise one protected service per interceptor kind (``protected``, parametrized "sync" and
"aio"): every test using it runs against both :class:`AuthInterceptor` and
:class:`AioAuthInterceptor`. Tests that move the key cache's clock get their own
(``make_protected``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from tests.attacks.forge import EcKey, Forge
from tests.attacks.targets import KINDS, Protected, start_protected
from tests.support import ServerThread, settings_for
from tests.support.protected import AUDIENCE
from tokensvc.keys.ring import KeyRing, SigningKey, load_kek
from tokensvc.redis.embedded import RedisProcess
from tokensvc_client._auth import Authenticator
from tokensvc_client.v1 import tokensvc_pb2 as pb
from tokensvc_client.v1 import tokensvc_pb2_grpc
from tokensvc_client.verifier import KeySet, Verifier


@pytest.fixture(scope="package")
def service(
    redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    srv = ServerThread(settings_for(redis_server.url, tmp_path_factory.mktemp("attacks") / "data"))
    yield srv
    srv.stop()


@pytest.fixture(scope="package")
def service_stub(service: ServerThread) -> Iterator[tokensvc_pb2_grpc.TokenServiceStub]:
    channel = service.channel()
    yield tokensvc_pb2_grpc.TokenServiceStub(channel)
    channel.close()


async def _load_signing_key(srv: ServerThread) -> SigningKey:
    ring = KeyRing(srv.running.redis, load_kek(srv.settings.kek_file, srv.settings.data_dir))
    await ring.load()
    return ring.signing


@pytest.fixture(scope="package")
def signing_key(service: ServerThread) -> EcKey:
    """The server's active private key, decrypted from Redis with the server's KEK."""
    signing = service.run(_load_signing_key(service))
    return EcKey.from_jwk(signing.key, signing.kid)


@pytest.fixture(scope="package")
def issued(service_stub: tokensvc_pb2_grpc.TokenServiceStub) -> pb.TokenPair:
    """A live session: forged tokens carry its ``sid`` so revocation checks see it active."""
    request = pb.IssueRequest(subject="alice", client_id="web", roles=["reader"])
    return service_stub.Issue(request).tokens


@pytest.fixture(scope="package")
def jwks(service_stub: tokensvc_pb2_grpc.TokenServiceStub) -> str:
    return service_stub.GetKeys(pb.GetKeysRequest()).jwks


@pytest.fixture(scope="package")
def keyset(jwks: str) -> KeySet:
    """What a client verifies with: the KeySet built from GetKeys' JWKS."""
    return KeySet.from_jwks(jwks)


@pytest.fixture
def forge(service: ServerThread, signing_key: EcKey, issued: pb.TokenPair) -> Forge:
    return Forge(
        key=signing_key,
        issuer=service.settings.issuer,
        audience=AUDIENCE,
        session_id=issued.session_id,
        refresh_token=issued.refresh_token,
        now=int(time.time()),
        leeway=service.settings.leeway,
    )


@pytest.fixture
def verifier(service: ServerThread, forge: Forge) -> Verifier:
    """A client's verifier, its clock pinned to the instant the case's tokens were forged."""
    return Verifier(
        issuer=service.settings.issuer,
        audience=AUDIENCE,
        leeway=service.settings.leeway,
        clock=lambda: forge.now,
    )


@pytest.fixture
def authenticator(verifier: Verifier) -> Authenticator:
    """The interceptors' decision with default options, over the case's pinned verifier."""
    return Authenticator(verifier)


@pytest.fixture(scope="package", params=KINDS)
def protected(request: pytest.FixtureRequest, service: ServerThread) -> Iterator[Protected]:
    """The sample service behind the blocking or the asyncio interceptor; its key cache's
    clock never moves, so after the start-up fetch no rejection may cause another."""
    server = start_protected(service, request.param)
    yield server
    server.close()


@pytest.fixture
def make_protected(service: ServerThread) -> Iterator[Callable[[str], Protected]]:
    """``make_protected(kind)``: a protected service of its own, for one test."""
    started: list[Protected] = []

    def make(kind: str) -> Protected:
        started.append(start_protected(service, kind))
        return started[-1]

    yield make
    for server in started:
        server.close()
