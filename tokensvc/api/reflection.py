"""Server reflection (``grpcurl``, ``grpc_cli``): the asyncio servicer, registered like
every other handler (through :class:`tokensvc.api.decoding.DecodingGuard`).

``grpc_reflection``'s ``enable_server_reflection`` picks its servicer by the type of the
server it is given; handed a registrar that stands in for the server, it picks the
*synchronous* one, which gRPC runs on a thread per open stream, out of reach of every
asyncio wrapper (an undecodable request was UNKNOWN with a traceback). So the asyncio
servicer is registered here explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc.aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

#: The reflection service's full name (it lists itself among the services).
SERVICE_NAME = reflection.SERVICE_NAME


def add_reflection(services: Iterable[str], registrar: grpc.aio.Server) -> None:
    """Serve reflection for ``services`` (and itself) on ``registrar``."""
    servicer = reflection.aio.ReflectionServicer((*services, SERVICE_NAME))  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, registrar)
