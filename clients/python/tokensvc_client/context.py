"""The verified claims of the call being handled, for handlers behind an auth interceptor.

:class:`~tokensvc_client.interceptor.AuthInterceptor` and
:class:`~tokensvc_client.aio_interceptor.AioAuthInterceptor` set a ``contextvars.ContextVar``
inside the handler's own execution (its worker thread, or its asyncio task), so a handler
-- and anything it calls -- reads them with :func:`current_claims` instead of having them
passed around::

    def GetOrder(self, request, context):
        claims = current_claims()
        if "orders:read" not in claims.roles: ...

With a Transaction Token (``txn-token`` metadata, docs/call-chains.md) the same context
holds its claims (:func:`current_transaction`), and the client library's
:class:`~tokensvc_client.propagation.TransactionPropagator` forwards the token to every
call the handler makes (:func:`outgoing_txn_token`; :func:`sending_txn_token` overrides
it for a block, e.g. with a replacement or at the edge that minted one).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

from tokensvc_client.errors import TokenServiceError
from tokensvc_client.verifier import Claims, TransactionClaims

__all__ = [
    "NoClaims",
    "TransactionLogFilter",
    "Verified",
    "current_access_token",
    "current_claims",
    "current_claims_or_none",
    "current_transaction",
    "current_transaction_or_none",
    "outgoing_txn_token",
    "sending_txn_token",
]


@dataclass(frozen=True, slots=True)
class Verified:
    """What the interceptor verified for one call: the access token and its claims, and
    the Transaction Token and its claims when the call carried one."""

    claims: Claims
    access_token: str
    transaction: TransactionClaims | None = None
    txn_token: str | None = None


_CALL: ContextVar[Verified | None] = ContextVar("tokensvc_client.verified", default=None)
#: the Transaction Token outgoing calls carry when it is not the inbound one
_OUTGOING: ContextVar[str | None] = ContextVar("tokensvc_client.outgoing_txn", default=None)


class NoClaims(TokenServiceError, LookupError):
    """No verified claims in this context: not a call authenticated by the interceptor
    (an exempt method, or code outside a handler), or no Transaction Token with it."""


def current_claims() -> Claims:
    """The verified claims of the call being handled.

    Raises:
        NoClaims: outside an authenticated call.
    """
    call = _CALL.get()
    if call is None:
        raise NoClaims("no verified claims in this context")
    return call.claims


def current_claims_or_none() -> Claims | None:
    """Like :func:`current_claims`, but ``None`` outside an authenticated call."""
    call = _CALL.get()
    return None if call is None else call.claims


def current_access_token() -> str:
    """The verified access token of the call being handled (e.g. the subject token of an
    ``Exchange`` for the next hop).

    Raises:
        NoClaims: outside an authenticated call.
    """
    call = _CALL.get()
    if call is None:
        raise NoClaims("no verified access token in this context")
    return call.access_token


def current_transaction() -> TransactionClaims:
    """The verified Transaction Token claims of the call being handled.

    Raises:
        NoClaims: outside an authenticated call, or the call carried no Transaction Token.
    """
    found = current_transaction_or_none()
    if found is None:
        raise NoClaims("no verified Transaction Token in this context")
    return found


def current_transaction_or_none() -> TransactionClaims | None:
    """Like :func:`current_transaction`, but ``None`` without one."""
    call = _CALL.get()
    return None if call is None else call.transaction


def outgoing_txn_token() -> str | None:
    """The Transaction Token outgoing calls made here carry: the one set by
    :func:`sending_txn_token`, else the call's own verified one (unmodified, as the
    draft asks), else ``None``."""
    token = _OUTGOING.get()
    if token is not None:
        return token
    call = _CALL.get()
    return None if call is None else call.txn_token


@contextlib.contextmanager
def sending_txn_token(token: str) -> Iterator[None]:
    """Make calls in the ``with`` block carry ``token`` (a replacement, or the one the
    edge minted) instead of the inbound Transaction Token."""
    reset = _OUTGOING.set(token)
    try:
        yield
    finally:
        _OUTGOING.reset(reset)


class TransactionLogFilter(logging.Filter):
    """Adds ``txn`` -- the transaction id of the call being handled, "" outside one -- to
    every record it sees, so log lines and traces of one transaction can be joined
    (``%(txn)s`` in a format; attach it to a handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        txn = current_transaction_or_none()
        record.txn = txn.transaction_id if txn is not None else ""
        return True


# -- for the interceptors ----------------------------------------------------------------


def context_with(verified: Verified) -> contextvars.Context:
    """A copy of the current context holding ``verified``: the blocking interceptor runs a
    handler inside it, so nothing is left behind in the (pooled) worker thread."""
    ctx = contextvars.copy_context()
    ctx.run(_CALL.set, verified)
    return ctx


@contextlib.contextmanager
def claims_set(verified: Verified) -> Iterator[None]:
    """Hold ``verified`` in the current context for the ``with`` block (asyncio handlers,
    which run in their call's own task)."""
    token = _CALL.set(verified)
    try:
        yield
    finally:
        _CALL.reset(token)
