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
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from tokensvc.api.health import ClientStreams
from tokensvc.config import Settings
from tokensvc.handlers import Context
from tokensvc.security.policy import CallerPolicy

#: The reflection service this module serves.
SERVICE = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]

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
        self.policy = policy
        self.streams = ClientStreams(
            settings.max_reflection_per_client, common_names=settings.allow_cn_identities
        )

    async def enter(self, context: Context) -> str:
        """Admit a stream (or abort the call); the key to :meth:`leave` with."""
        caller = self.streams.caller(context)
        admitted = self.policy.admits_reflection(caller.peer, is_loopback(caller.address))
        if self.enforce and not admitted:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, DENIED)
        return await self.streams.enter(context, TOO_MANY, caller)

    def leave(self, key: str) -> None:
        self.streams.leave(key)


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
