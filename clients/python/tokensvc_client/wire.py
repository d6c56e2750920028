"""What both sides of the wire agree on: header names and their parsing.

The server (``tokensvc``) and this library read and write the same metadata; this public
module holds those rules once so neither side imports the other's private modules.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Final

from tokensvc_client.errors import InvalidToken, Reason

#: Trailing metadata key of the server's Refresh grace window, whole seconds (absent: strict).
GRACE_HEADER: Final = "tokensvc-refresh-grace-seconds"

#: gRPC invocation metadata as the interceptors and servicers see it.
Metadata = Sequence[tuple[str, str | bytes]] | None


def bearer_token(metadata: Metadata) -> str:
    """The token of the one ``authorization: Bearer <token>`` header (scheme in any case).

    Raises:
        InvalidToken: ``MISSING`` without the header; ``MALFORMED`` for several headers,
            another scheme or a value that is not ``Bearer`` + one token.
    """
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        raise InvalidToken(Reason.MISSING)
    if len(values) > 1:
        raise InvalidToken(Reason.MALFORMED, "more than one authorization header")
    value = values[0]
    if not isinstance(value, str):
        raise InvalidToken(Reason.MALFORMED, "binary authorization header")
    scheme, _, token = value.partition(" ")
    token = token.lstrip(" ")
    if scheme.lower() != "bearer":
        raise InvalidToken(Reason.MALFORMED, "not a bearer token")
    if token.split() != [token]:  # empty, or whitespace inside (str.split runs in C)
        raise InvalidToken(Reason.MALFORMED, "bearer value is not one token")
    return token


#: Invocation metadata key carrying a Transaction Token (the draft's ``Txn-Token`` HTTP
#: header, lower-case as gRPC metadata keys are).
TXN_TOKEN_HEADER: Final = "txn-token"


def txn_token(metadata: Metadata, seen: Container[str] | None = None) -> str | None:
    """The Transaction Token of the one ``txn-token`` entry; ``None`` without one.

    ``seen``: values a verifier accepted before, whose form need not be checked again (the
    caller adds to it only after verification: what a client sends never fills it).

    Raises:
        InvalidToken: ``MALFORMED`` for several entries (the draft: exactly one token), a
            binary value or one that is not a single token.
    """
    values = [value for key, value in metadata or () if key.lower() == TXN_TOKEN_HEADER]
    if not values:
        return None
    if len(values) > 1:
        raise InvalidToken(Reason.MALFORMED, "more than one txn-token entry")
    value = values[0]
    if seen is not None and value in seen:
        return str(value)  # only verified str values are ever added
    if not isinstance(value, str) or value.split() != [value]:
        raise InvalidToken(Reason.MALFORMED, "txn-token is not one token")
    return value
