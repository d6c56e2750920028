"""When a failed Refresh may be sent again: only when the server announced a grace window.

Refresh rotates the token it spends. If its reply is lost (a timeout, a dropped
connection) the client cannot know whether the rotation happened; with strict rotation a
second attempt would present a spent token and revoke the session. A server started with
``--refresh-grace-seconds N`` answers the immediately previous token, for N seconds, with
the *same* successor again, so one retry is safe there and only there.

With a window, every Refresh, Issue and GetKeys answer carries it in the trailing metadata
``tokensvc-refresh-grace-seconds``; a strict server sends no such header (a successful
answer without it means strict). :class:`GraceWindow` remembers what the server last said;
the clients (:mod:`tokensvc_client.client`, :mod:`tokensvc_client.aio`) retry a Refresh
once on ``UNAVAILABLE``/``DEADLINE_EXCEEDED`` when it is above 0 and the first attempt
began less than that long ago. Not knowing yet, they ask with one GetKeys call. Any other
failure, or a strict server, is never retried.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc

from tokensvc_client.wire import GRACE_HEADER

RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class GraceWindow:
    """The server's grace window as last announced (``None``: not heard yet)."""

    def __init__(self) -> None:
        self.seconds: float | None = None

    def learn(self, metadata: Iterable[Any] | None, *, answered: bool = False) -> None:
        """Take the announcement from an answer's trailing metadata. ``answered``: the
        call succeeded, so a missing header means a strict server (a failed call may come
        from a proxy or a lost connection: only a header there says anything)."""
        for key, value in metadata or ():
            if key == GRACE_HEADER:
                try:
                    self.seconds = max(0.0, float(value))
                except ValueError:
                    self.seconds = 0.0
                return
        if answered:
            self.seconds = 0.0

    def worth_asking(self, err: grpc.RpcError) -> bool:
        """The failure could be retried, but the window is not known yet."""
        return self.seconds is None and _code(err) in RETRYABLE

    def allows_retry(self, err: grpc.RpcError, elapsed: float) -> bool:
        """Whether to send the Refresh that failed with ``err`` once more, ``elapsed``
        seconds after the first attempt began."""
        return _code(err) in RETRYABLE and elapsed < (self.seconds or 0.0)


def _code(err: grpc.RpcError) -> Any:
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def trailing(err: grpc.RpcError) -> Any:
    """The trailing metadata of a failed call, if gRPC kept any."""
    get = getattr(err, "trailing_metadata", None)
    return get() if callable(get) else None
