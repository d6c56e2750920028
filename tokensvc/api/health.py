"""``grpc.health.v1.Health``: grpcio's asyncio servicer, its Watch streams capped per client.

``Check`` is one unary call, open to every caller (load balancers and probes send no client
certificate), and unchanged. ``Watch`` is a stream that stays open as long as its client
likes -- for any service name: an unknown one is answered ``SERVICE_UNKNOWN`` and stays
open, as the health-checking protocol prescribes -- so, like WatchRevocations
(``--max-watchers-per-client``) and reflection (``--max-reflection-per-client``), one
client (its mTLS identity wherever it connects from, else its network: see
:attr:`~tokensvc.api.admission.Caller.key`) holds at most
``--max-health-watches-per-client`` of them per process; more are refused
``RESOURCE_EXHAUSTED`` before anything is held for them. A channel with client-side health
checking (gRPC's ``healthCheckConfig``) opens one Watch per connection, so each pod of a
workload holds one per tokensvc process it is connected to: a workload with more pods than
the cap per process needs a higher cap (as it does for ``--max-watchers-per-client``).
Watch streams are not calls the drain waits for: on shutdown they see ``NOT_SERVING`` and
are cancelled with the server.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tokensvc.api.admission import Caller, address_of
from tokensvc.config import Settings
from tokensvc.handlers import Context
from tokensvc_client.peer import peer_of

TOO_MANY = "too many open Health.Watch streams from this client; close one and retry"


class ClientStreams:
    """Open streams per client (:attr:`Caller.key`), at most ``max_per_client`` at once
    (counted per process)."""

    def __init__(self, max_per_client: int, *, common_names: bool = False) -> None:
        self.max_per_client = max_per_client
        self.common_names = common_names
        self._open: dict[str, int] = {}

    def caller(self, context: Context) -> Caller:
        """Who opens the stream: the identity, else the network it comes from."""
        peer = peer_of(context, common_names=self.common_names)
        return Caller(peer, address_of(context.peer() or ""))

    async def enter(self, context: Context, refusal: str, caller: Caller | None = None) -> str:
        """Admit a stream of ``caller`` (default: :meth:`caller` of ``context``) or abort the
        call RESOURCE_EXHAUSTED with ``refusal``; returns the key to :meth:`leave` with when
        the stream ends."""
        key = (caller or self.caller(context)).key
        held = self._open.get(key, 0)
        if held >= self.max_per_client:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        self._open[key] = held + 1
        return key

    def leave(self, key: str) -> None:
        held = self._open.pop(key, 1) - 1
        if held > 0:
            self._open[key] = held

    def open_streams(self, key: str) -> int:
        """Streams ``key`` holds now."""
        return self._open.get(key, 0)


class CappedHealth(HealthServicer):  # type: ignore[misc]
    """grpcio's asyncio health servicer whose Watch streams are admitted by a
    :class:`ClientStreams` (see the module doc)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.watches = ClientStreams(
            settings.max_health_watches_per_client, common_names=settings.allow_cn_identities
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        key = await self.watches.enter(context, TOO_MANY)
        try:
            await super().Watch(request, context)
        finally:
            self.watches.leave(key)
