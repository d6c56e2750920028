"""The interceptor targets of the attack suite: the decision in process, and over the wire.

* :func:`decide` drives :meth:`tokensvc_client._auth.Authenticator.decide` -- the one
  decision both interceptors run -- with a :class:`KeySet`, stepping the generator the way
  the interceptors do (:func:`tokensvc_client._auth.step`), and records every key request
  it makes.
* :class:`Protected` is a real gRPC server on loopback with :class:`AuthInterceptor`
  (blocking ``grpc.server``) or :class:`AioAuthInterceptor` (``grpc.aio`` server on its own
  event loop thread) in front of one unary method that answers with the claims its handler
  sees. Keys come from the real tokensvc through ``TokenClient.get_keys`` /
  ``AsyncTokenClient.get_keys``, wrapped only to count the calls
  (:func:`tests.support.protected.start_server`).

The JWKS cache's clock is a :class:`ManualClock`: it moves only when a test moves it, so
whether a rejection may cause a fetch (max age, refetch interval) does not depend on how
long a shared machine takes to run the suite.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests.support import ServerThread
from tests.support.protected import Setup, start_server
from tokensvc_client import Claims, current_claims
from tokensvc_client._auth import Authenticator, step
from tokensvc_client._rejection import Rejection
from tokensvc_client.jwks import KeyRequest
from tokensvc_client.verifier import KeySet

SERVICE = "tokensvc.attacks.Echo"
METHOD = f"/{SERVICE}/Call"
KINDS = ("sync", "aio")
#: gRPC refuses request headers over 16 KiB by default, before any interceptor runs. The
#: attack servers raise that limit so the 1 MB tokens reach the interceptor and it is the
#: interceptor's own size cap that must reject them.
SERVER_OPTIONS = (
    ("grpc.max_metadata_size", 4 << 20),
    ("grpc.absolute_max_metadata_size", 4 << 20),
)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# -- the decision, in process ------------------------------------------------------------


def decide(
    auth: Authenticator,
    metadata: Sequence[tuple[str, str]],
    keys: KeySet | None,
    newer: KeySet | None = None,
) -> tuple[Claims | Rejection, list[KeyRequest]]:
    """Run one decision to its end: ``keys`` answers a request for the current key set,
    ``newer`` (default: there is none) one for a set newer than the current one.

    Returns:
        the outcome and the key requests the decision made, in order.
    """
    decision = auth.decide(METHOD, metadata)
    requests: list[KeyRequest] = []
    outcome = step(decision, None)
    while isinstance(outcome, KeyRequest):
        requests.append(outcome)
        outcome = step(decision, keys if outcome.lacking is None else newer)
    return outcome, requests


# -- the interceptors, over the wire -----------------------------------------------------


class ManualClock:
    """Monotonic seconds that advance only through :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Answer:
    """What the caller got: a status, its details, and (if OK) the claims the handler saw."""

    code: grpc.StatusCode
    details: str
    seen: dict[str, Any] | None = None


def _seen() -> bytes:
    claims = current_claims()
    return json.dumps(
        {"sub": claims.subject, "sid": claims.session_id, "jti": claims.token_id}
    ).encode()


@dataclass
class Protected:
    """A running protected service. ``fetches`` counts the JWKS cache's fetches, ``runs``
    the handler's executions; ``clock`` is the JWKS cache's clock."""

    kind: str
    target: str = ""
    clock: ManualClock = field(default_factory=ManualClock)
    fetches: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None
    _channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    def call(self, token: str) -> Answer:
        """Call the protected method with ``authorization: Bearer <token>``."""
        return self.call_with(bearer(token))

    def call_with(self, metadata: Sequence[tuple[str, str]]) -> Answer:
        try:
            reply = self.channel.unary_unary(METHOD)(b"", metadata=metadata, timeout=10)
        except grpc.RpcError as err:
            return Answer(err.code(), err.details() or "")
        return Answer(grpc.StatusCode.OK, "", json.loads(reply))

    def call_all(self, tokens: Sequence[str]) -> list[Answer]:
        """Call once per token, all calls in flight at the same time."""
        method = self.channel.unary_unary(METHOD)
        pending = [method.future(b"", metadata=bearer(t), timeout=10) for t in tokens]
        answers = []
        for call in pending:
            try:
                answers.append(Answer(grpc.StatusCode.OK, "", json.loads(call.result())))
            except grpc.RpcError as err:
                answers.append(Answer(err.code(), err.details() or ""))
        return answers

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self.stop()


def _handler(protected: Protected) -> grpc.GenericRpcHandler:
    """The one protected method: records the run, answers with the claims it sees."""

    def call(request: bytes, context: Any) -> bytes:
        protected.runs.append("sync")
        return _seen()

    async def call_aio(request: bytes, context: Any) -> bytes:
        protected.runs.append("aio")
        return _seen()

    method = call if protected.kind == "sync" else call_aio
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(method)}
    )


def start_protected(service: ServerThread, kind: str) -> Protected:
    """A protected service of ``kind`` ("sync" or "aio"), its key cache loaded (one fetch)."""
    protected = Protected(kind)
    setup = Setup(
        handler=_handler(protected),
        fetches=protected.fetches,
        cache_kw={"clock": protected.clock},
        interceptor_kw={"leeway": service.settings.leeway},
        options=SERVER_OPTIONS,
        worker_prefix="attacks-worker",
        load=True,
    )
    protected.target, protected.stop = start_server(service, kind, setup)
    return protected
