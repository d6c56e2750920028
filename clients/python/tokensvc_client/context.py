"""The verified claims of the call being handled, for handlers behind an auth interceptor.

:class:`~tokensvc_client.interceptor.AuthInterceptor` and
:class:`~tokensvc_client.aio_interceptor.AioAuthInterceptor` set a ``contextvars.ContextVar``
inside the handler's own execution (its worker thread, or its asyncio task), so a handler
-- and anything it calls -- reads them with :func:`current_claims` instead of having them
passed around::

    def GetOrder(self, request, context):
        claims = current_claims()
        if "orders:read" not in claims.roles: ...
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from contextvars import ContextVar

from tokensvc_client.errors import TokenServiceError
from tokensvc_client.verifier import Claims

__all__ = ["NoClaims", "current_claims", "current_claims_or_none"]

_CLAIMS: ContextVar[Claims | None] = ContextVar("tokensvc_client.claims", default=None)


class NoClaims(TokenServiceError, LookupError):
    """No verified claims in this context: not a call authenticated by the interceptor
    (an exempt method, or code outside a handler)."""


def current_claims() -> Claims:
    """The verified claims of the call being handled.

    Raises:
        NoClaims: outside an authenticated call.
    """
    claims = _CLAIMS.get()
    if claims is None:
        raise NoClaims("no verified claims in this context")
    return claims


def current_claims_or_none() -> Claims | None:
    """Like :func:`current_claims`, but ``None`` outside an authenticated call."""
    return _CLAIMS.get()


# -- for the interceptors ----------------------------------------------------------------


def context_with(claims: Claims) -> contextvars.Context:
    """A copy of the current context holding ``claims``: the blocking interceptor runs a
    handler inside it, so nothing is left behind in the (pooled) worker thread."""
    ctx = contextvars.copy_context()
    ctx.run(_CLAIMS.set, claims)
    return ctx


@contextlib.contextmanager
def claims_set(claims: Claims) -> Iterator[None]:
    """Hold ``claims`` in the current context for the ``with`` block (asyncio handlers,
    which run in their call's own task)."""
    token = _CLAIMS.set(claims)
    try:
        yield
    finally:
        _CLAIMS.reset(token)
