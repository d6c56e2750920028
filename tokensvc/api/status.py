"""Service errors and the one table that maps them to gRPC status codes (SPEC.md section 10).

Servicer methods raise these; :func:`rpc` turns them into status codes. Anything else
becomes INTERNAL with a correlation id that is logged with the traceback -- no Python
traceback or exception text ever reaches a caller.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from tokensvc.api.decoding import CHECKS_DECODING, NOT_DECODABLE, UNDECODABLE
from tokensvc.observe import tracing
from tokensvc.store import StoreUnavailable, call_deadline

log = logging.getLogger("tokensvc.rpc")


class ServiceError(Exception):
    """Root of the errors a servicer method may raise on purpose."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotAuthenticated(ServiceError):
    """The token is invalid, expired, revoked or reused. Message is a stable reason code."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Denied(ServiceError):
    """The caller's identity may not do this (caller policy, locked subject)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(ServiceError):
    """Over a rate limit; ``retry-after`` (whole seconds) goes into trailing metadata."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, -(-retry_after_ms // 1000))


class Guarded(Protocol):
    """What :func:`rpc` needs of a servicer: admission of each call, and failure reports."""

    async def admit(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> None: ...

    async def rejected(self, rpc: str, err: ServiceError) -> None: ...


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]
StreamHandler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]


@contextlib.asynccontextmanager
async def _statuses(
    servicer: Guarded, name: str, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[None]:
    """Admit the caller, then turn what the handler raises into a status code."""
    tracing.serving(context)  # for the trace id of log lines and audit records
    try:
        await servicer.admit(name, context)
        with call_deadline(context.time_remaining()):  # how long a moving slot is retried
            yield
    except ServiceError as err:
        if isinstance(err, NotAuthenticated | Denied):
            await servicer.rejected(name, err)
        if isinstance(err, RateLimited):
            context.set_trailing_metadata((("retry-after", str(err.retry_after)),))
        await context.abort(err.code, err.message)
    except StoreUnavailable as err:
        log.warning("rpc=%s token store unavailable: %s", name, err)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "token store unavailable; retry later")
    except grpc.aio.AbortError:
        raise
    except Exception:
        correlation = uuid.uuid4().hex
        log.exception("rpc=%s internal error correlation_id=%s", name, correlation)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation})"
        )


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Decorate an async servicer method: the caller is admitted first (policy, limits);
    a request that was not valid protobuf is refused (:mod:`tokensvc.api.decoding`); domain
    errors -> status codes, no tracebacks out."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Guarded, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        async with _statuses(self, name, context):
            if request is UNDECODABLE:
                raise BadRequest(NOT_DECODABLE)
            return await method(self, request, context)
        raise AssertionError("context.abort returned")  # pragma: no cover

    setattr(wrapper, CHECKS_DECODING, True)
    return wrapper


def stream_rpc(method: StreamHandler[Req, Resp]) -> StreamHandler[Req, Resp]:
    """:func:`rpc` for a server-streaming method (an async generator)."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Guarded, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        async with _statuses(self, name, context):
            if request is UNDECODABLE:
                raise BadRequest(NOT_DECODABLE)
            async for item in method(self, request, context):
                yield item

    setattr(wrapper, CHECKS_DECODING, True)
    return wrapper
