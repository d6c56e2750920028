"""Server reflection (``grpcurl``, ``grpc_cli``): the asyncio servicer, behind the caller
policy and a cap of open streams per client.

``grpc_reflection``'s ``enable_server_reflection`` picks its servicer by the type of the
server it is given; handed a registrar that stands in for the server (the decoding guard),
it picks the *synchronous* one, which gRPC runs on a thread per open stream, out of reach of
every asyncio wrapper. So the asyncio servicer is registered here explicitly.

A reflection stream stays open as long as its client likes, so reflection is bounded like
every stream a client can open: who may open one is the caller policy's
(:meth:`~tokensvc.security.policy.CallerPolicy.admits_reflection`: admin identities and
loopback callers by default; everyone in plaintext development mode, which is loopback
only), and one client (its identity, else its network) holds at most
``--max-reflection-per-client`` streams at once; more are refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from tokensvc.api.admission import Caller, address_of
from tokensvc.config import Settings
from tokensvc.handlers import Context
from tokensvc.security.policy import CallerPolicy
from tokensvc_client.peer import peer_of

#: The reflection service's full name (it lists itself among the services).
SERVICE_NAME = reflection.SERVICE_NAME
DENIED = "caller is not allowed to use server reflection"
TOO_MANY = "too many open reflection streams from this client; close one and retry"


def is_loopback(address: str) -> bool:
    """Whether a caller's address (``address_of``) is on this host: 127.0.0.0/8, ::1, or a
    unix socket."""
    if address.startswith("unix:"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class ReflectionGate:
    """Admits reflection streams: the caller policy, then at most ``max_per_client`` open
    streams per client (counted per process)."""

    def __init__(self, settings: Settings, policy: CallerPolicy) -> None:
        self.enforce = not settings.insecure
        self.common_names = settings.allow_cn_identities
        self.policy = policy
        self.max_per_client = settings.max_reflection_per_client
        self._open: dict[str, int] = {}

    async def enter(self, context: Context) -> str:
        """Admit a stream (or abort the call); the key to :meth:`leave` with."""
        peer = peer_of(context, common_names=self.common_names)
        caller = Caller(peer, address_of(context.peer() or ""))
        if self.enforce and not self.policy.admits_reflection(peer, is_loopback(caller.address)):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED)
        key = caller.key
        held = self._open.get(key, 0)
        if held >= self.max_per_client:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_MANY)
        self._open[key] = held + 1
        return key

    def leave(self, key: str) -> None:
        held = self._open.pop(key, 1) - 1
        if held > 0:
            self._open[key] = held

    def open_streams(self, key: str) -> int:
        return self._open.get(key, 0)


class _Reflection(reflection.aio.ReflectionServicer):  # type: ignore[misc,name-defined]
    """The asyncio reflection servicer, each stream admitted by a :class:`ReflectionGate`."""

    def __init__(self, names: tuple[str, ...], gate: ReflectionGate) -> None:
        super().__init__(names)
        self._gate = gate

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterator[Any], context: Context
    ) -> AsyncIterator[Any]:
        key = await self._gate.enter(context)
        try:
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response
        finally:
            self._gate.leave(key)


def add_reflection(
    services: Iterable[str], registrar: grpc.aio.Server, gate: ReflectionGate
) -> None:
    """Serve reflection for ``services`` (and itself) on ``registrar``, admitted by ``gate``."""
    servicer = _Reflection((*services, SERVICE_NAME), gate)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, registrar)
