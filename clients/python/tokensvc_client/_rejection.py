"""Rejections: how the decision refuses a call, and the stock refusals.

A :class:`Rejection` carries the status code, the message and the trailing metadata the
caller sees; :func:`reason_of` gives its stable reason code (a metric attribute).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from tokensvc_client.errors import REASON_TRAILER, Reason

#: The prefix of a rejected Transaction Token's message (its reason code follows).
TXN_PREFIX = "invalid txn-token: "
#: Trailing metadata of a rejection: a tuple, so a :class:`Rejection` stays hashable.
Trailers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a call is refused: the status code, the whole message the caller sees and the
    trailing metadata sent with it (e.g. ``tokensvc-reason``, ``www-authenticate``)."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: Trailers = ()

    @classmethod
    def invalid_token(cls, reason: Reason) -> Rejection:
        """UNAUTHENTICATED with nothing but the stable reason code (docs/design.md, Errors)."""
        return cls(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {reason.value}")


#: No key set could be fetched yet: not the caller's fault, and worth a retry.
KEYS_UNAVAILABLE = Rejection(grpc.StatusCode.UNAVAILABLE, "token keys unavailable")
#: A hook (revocation check, method policy) raised: fail closed.
CHECK_FAILED = Rejection(grpc.StatusCode.UNAVAILABLE, "authorization check failed")

#: The token is bound to a certificate (``cnf``) other than the call's client certificate,
#: or the call has none.
CERTIFICATE_MISMATCH = Rejection.invalid_token(Reason.CERTIFICATE_MISMATCH)
#: ``require_binding`` and the token is not bound to a certificate.
UNBOUND = Rejection.invalid_token(Reason.UNBOUND)
#: The token lacks a role the method's :class:`StepUp` requires.
INSUFFICIENT_ROLE = Rejection(
    grpc.StatusCode.PERMISSION_DENIED,
    "insufficient role",
    ((REASON_TRAILER, Reason.INSUFFICIENT_ROLE.value),),
)


def reason_of(rejection: Rejection) -> str:
    """The stable reason code of a rejection (a metric attribute): ``invalid token: X``
    gives X, ``invalid txn-token: X`` gives ``txn_token:X``, else its ``tokensvc-reason``
    trailer, else its status code's name."""
    prefix = "invalid token: "
    if rejection.message.startswith(prefix):
        return rejection.message[len(prefix) :]
    if rejection.message.startswith(TXN_PREFIX):
        return "txn_token:" + rejection.message[len(TXN_PREFIX) :]
    trailers = dict(rejection.trailing_metadata)
    return trailers.get(REASON_TRAILER) or rejection.code.name.lower()
