"""Service errors and the one table that maps them to gRPC status codes (SPEC.md section 10).

Servicer methods raise these; :func:`rpc` turns them into status codes. Anything else
becomes INTERNAL with a correlation id that is logged with the traceback -- no Python
traceback or exception text ever reaches a caller.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from tokensvc.store import StoreUnavailable

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
    code = grpc.StatusCode.PERMISSION_DENIED


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def rpc(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Decorate an async servicer method: domain errors -> status codes, no tracebacks out."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await method(self, request, context)
        except ServiceError as err:
            await context.abort(err.code, err.message)
        except StoreUnavailable as err:
            log.warning("rpc=%s token store unavailable: %s", method.__name__, err)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "token store unavailable; retry later")
        except grpc.aio.AbortError:
            raise
        except Exception:
            correlation = uuid.uuid4().hex
            log.exception("rpc=%s internal error correlation_id=%s", method.__name__, correlation)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation})"
            )
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper
