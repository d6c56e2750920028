"""The one table that maps the error families to gRPC status codes (docs/design.md, Errors).

Servicer methods raise the refusals of :mod:`tokensvc.errors` (:class:`ServiceError`) and
the store raises :class:`StoreUnavailable`; :func:`rpc` turns them into status codes by
:data:`STATUS`. Anything else becomes INTERNAL with a correlation id that is logged with
the traceback -- no Python traceback or exception text ever reaches a caller.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Final, Protocol, TypeVar

import grpc
import grpc.aio

from tokensvc.api.decoding import CHECKS_DECODING, NOT_DECODABLE, UNDECODABLE
from tokensvc.errors import (
    BadRequest,
    Denied,
    KeyUnavailable,
    NotAuthenticated,
    RateLimited,
    ServiceError,
    TokensvcError,
)
from tokensvc.observe import tracing
from tokensvc.store import StoreUnavailable, call_deadline, enter_deadline, leave_deadline

log = logging.getLogger("tokensvc.rpc")

#: The one table from the error families (:mod:`tokensvc.errors`) to gRPC status codes: an
#: error takes the entry of its nearest listed ancestor (a subclass needs no entry).
STATUS: Final[Mapping[type[TokensvcError], grpc.StatusCode]] = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotAuthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Denied: grpc.StatusCode.PERMISSION_DENIED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    KeyUnavailable: grpc.StatusCode.UNAVAILABLE,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    ServiceError: grpc.StatusCode.INTERNAL,
}
#: What a caller reads for an error that is not a :class:`ServiceError` (whose message is
#: written for the caller); anything not in :data:`STATUS` is INTERNAL with a correlation id.
_UNAVAILABLE_MESSAGE: Final = "token store unavailable; retry later"


def status_of(err: TokensvcError) -> grpc.StatusCode:
    """The status code of ``err`` by :data:`STATUS`; INTERNAL for an unlisted family."""
    for cls in type(err).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


class Guarded(Protocol):
    """What :func:`rpc` needs of a servicer: admission of each call, and failure reports."""

    async def admit(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> None: ...

    async def rejected(self, rpc: str, err: NotAuthenticated | Denied) -> None: ...


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]
StreamHandler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]


async def _refuse(
    servicer: Guarded, name: str, context: grpc.aio.ServicerContext[Any, Any], err: Exception
) -> None:
    """Answer the status code of ``err`` raised by admission or the handler (never returns:
    ``context.abort`` raises)."""
    if isinstance(err, ServiceError):
        if isinstance(err, NotAuthenticated | Denied):
            await servicer.rejected(name, err)
        if isinstance(err, RateLimited):
            context.set_trailing_metadata((("retry-after", str(err.retry_after)),))
        await context.abort(status_of(err), err.message)
    elif isinstance(err, StoreUnavailable):
        log.warning("rpc=%s token store unavailable: %s", name, err)
        await context.abort(status_of(err), _UNAVAILABLE_MESSAGE)
    else:
        correlation = uuid.uuid4().hex
        log.exception("rpc=%s internal error correlation_id=%s", name, correlation)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation})"
        )


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
    except grpc.aio.AbortError:
        raise
    except Exception as err:
        await _refuse(servicer, name, context, err)


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Decorate an async servicer method: the caller is admitted first (policy, limits);
    a request that was not valid protobuf is refused (:mod:`tokensvc.api.decoding`); domain
    errors -> status codes, no tracebacks out.

    :func:`_statuses` written out inline: this runs on every unary call, and a context
    manager generator costs more than the rest of the wrapper."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: Guarded, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        tracing.serving(context)  # for the trace id of log lines and audit records
        try:
            await self.admit(name, context)
            # how long a moving slot is retried (call_deadline, without a generator)
            deadline = enter_deadline(context.time_remaining())
            try:
                if request is UNDECODABLE:
                    raise BadRequest(NOT_DECODABLE)
                return await method(self, request, context)
            finally:
                leave_deadline(deadline)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _refuse(self, name, context, err)
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
