"""The revocation feed: interceptors refuse revoked access tokens within a second.

An :class:`~tokensvc_client.AuthInterceptor` verifies tokens locally, so without help a
revoked access token stays usable until its ``exp``. A :class:`RevocationFeed` (blocking
servers) or :class:`AioRevocationFeed` (``grpc.aio`` servers) subscribes to the token
service's ``WatchRevocations`` stream, keeps every revocation still in force in memory
(:class:`RevocationSet`) and is the interceptor's ``revocation_check``::

    feed = RevocationFeed(channel("tokensvc:50051", ca="ca.pem", options=FEED_CHANNEL_OPTIONS))
    feed.start()
    interceptor = AuthInterceptor(
        keys, issuer="https://tokensvc", audience="orders", revocation_check=feed
    )

and with asyncio (``start`` needs the running event loop)::

    feed = AioRevocationFeed(aio_channel("tokensvc:50051", ca="ca.pem"))
    feed.start()
    interceptor = AioAuthInterceptor(keys, ..., revocation_check=feed)
    ...
    await feed.close()

The channel is the caller's: the feed never closes it.

Lost connections: the feed reconnects with exponential backoff and jitter and resumes from
the id of the last event it received, so nothing is missed; when the server no longer holds
that id it starts over (``RESET`` and everything still in force). An id not after the last
one received (the server's Redis failed over to a replica that lacked entries, or was
restored) makes the feed drop its position and start over the same way. While the feed is down
the last known set stays in force. Down longer than ``max_staleness`` seconds, the feed is
*stale*: by default calls keep being checked against the last known set (counted in
``stale_checks``, a warning logged at most once a minute); with ``fail_closed=True`` every
check raises :class:`~tokensvc_client.FeedStale`, which the interceptors answer with UNAVAILABLE
``authorization check failed``.

What is held and what a check costs: :mod:`tokensvc_client.revocations`.

Key events: given a feed, an interceptor has it tell its JWKS cache of every key
revocation (:meth:`RevocationFeed.follow_keys`): after an emergency rotation
(``RotateKeys(now, revoke_old)``) the cache fetches the new key at once, so tokens it
signs verify within a second rather than after the unknown-``kid`` refetch interval
(30 s by default), and a flood of events costs at most four fetches a second
(:mod:`tokensvc_client.jwks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Protocol

import grpc
import grpc.aio

from tokensvc_client._feed_core import FeedStats, _FeedCore
from tokensvc_client.revocations import RevocationSet
from tokensvc_client.v1 import tokensvc_pb2_grpc
from tokensvc_client.verifier import Claims

__all__ = [
    "FEED_CHANNEL_OPTIONS",
    "AioRevocationFeed",
    "RevocationFeed",
]

log = logging.getLogger("tokensvc_client.revocations")

#: Channel options for a feed's channel: gRPC's own reconnect backoff (which grows to two
#: minutes by default) capped at 5 s, so a feed resumes within seconds of the token
#: service coming back. Pass as ``options=`` to :func:`~tokensvc_client.channels.channel`.
FEED_CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else ""
        return f"{getattr(code, 'name', code)}: {details}"
    return f"{type(err).__name__}: {err}"


class _KeyEvents(Protocol):
    """What :meth:`_FeedBase.follow_keys` needs of a JWKS cache."""

    def key_event(self) -> None: ...


class _FeedBase:
    """Properties, counters and the check both feeds offer."""

    _core: _FeedCore

    def __call__(self, claims: Claims) -> bool:
        """The interceptor's ``revocation_check``: whether ``claims``' token is revoked.

        Raises:
            FeedStale: the feed fails closed and has been down too long.
        """
        return self._core.check(claims)

    def follow_keys(self, keys: _KeyEvents) -> None:
        """Tell ``keys`` (a JWKS cache) of every key revocation, so that after an emergency
        rotation it fetches the new key within a second instead of its refetch interval.
        The interceptors call this for the feed they are given."""
        if keys.key_event not in self._core.key_listeners:
            self._core.key_listeners.append(keys.key_event)

    @property
    def revocations(self) -> RevocationSet:
        return self._core.revocations

    @property
    def connected(self) -> bool:
        """The stream is up."""
        return self._core.connected

    @property
    def healthy(self) -> bool:
        """Connected, or down for at most ``max_staleness`` seconds."""
        return not self._core.stale()

    @property
    def last_event_id(self) -> str:
        """Where the next stream resumes."""
        return self._core.last_event_id

    @property
    def events(self) -> int:
        return self._core.events

    @property
    def reconnects(self) -> int:
        return max(0, self._core.streams - 1)

    @property
    def stale_checks(self) -> int:
        return self._core.stale_checks

    def stats(self) -> FeedStats:
        return self._core.stats()


class RevocationFeed(_FeedBase):
    """The revocation feed over a blocking channel, consumed by a daemon thread.

    Args:
        channel: a channel to the token service (e.g. from
            :func:`~tokensvc_client.channels.channel`, with :data:`FEED_CHANNEL_OPTIONS`);
            the caller keeps owning it.
        max_staleness: seconds the feed may be down before it is stale.
        fail_closed: stale, refuse every call (:class:`~tokensvc_client.FeedStale`,
            answered UNAVAILABLE) instead of checking against the last known set.
        backoff: ``(base, cap)`` seconds of the reconnection backoff
            (:class:`~tokensvc_client._feed_core.Backoff`).
        clock: current UNIX time, for the entries' expiry.
        metadata: sent with every ``WatchRevocations`` call.
        revocations: the set to fill (default: a new one).

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        max_staleness: float = 60.0,
        fail_closed: bool = False,
        backoff: tuple[float, float] = (0.1, 5.0),
        clock: Callable[[], float] = time.time,
        metadata: Sequence[tuple[str, str]] = (),
        revocations: RevocationSet | None = None,
    ) -> None:
        self._core = _FeedCore(
            max_staleness=max_staleness,
            fail_closed=fail_closed,
            backoff=backoff,
            clock=clock,
            revocations=revocations,
        )
        self._channel = channel
        self._stub = tokensvc_pb2_grpc.TokenServiceStub(channel)
        self._metadata = tuple(metadata)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._thread: threading.Thread | None = None
        self._channel_ready = False

    def start(self) -> RevocationFeed:
        """Start consuming the stream (once); returns the feed."""
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("revocation feed closed")
            if self._thread is not None:
                return self
            self._core.restart_clock()
            self._channel.subscribe(self._on_connectivity, try_to_connect=False)
            self._thread = threading.Thread(
                target=self._run, name="tokensvc-revocation-feed", daemon=True
            )
            self._thread.start()
        return self

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the stream is up; whether it is."""
        return self._core.ready.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the stream and its thread (the channel stays open)."""
        with self._lock:
            self._closed.set()
            call, thread = self._call, self._thread
        if call is not None:
            call.cancel()
        if thread is not None:
            with contextlib.suppress(Exception):  # e.g. the channel closed already
                self._channel.unsubscribe(self._on_connectivity)
            if thread is not threading.current_thread():
                thread.join(timeout)

    def __enter__(self) -> RevocationFeed:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _on_connectivity(self, state: grpc.ChannelConnectivity) -> None:
        self._channel_ready = state is grpc.ChannelConnectivity.READY

    def _probe(self, stream: int, call: Any) -> None:
        core = self._core
        while not self._closed.wait(core.settle / 2):
            if core.settled(stream, call.is_active(), self._channel_ready):
                return

    def _run(self) -> None:
        core = self._core
        while not self._closed.is_set():
            why = "stream ended"
            with self._lock:
                if self._closed.is_set():
                    break
                stream, request = core.begin()
                # a grpc._channel._MultiThreadedRendezvous: a Call, a Future and an iterator
                call: Any = self._stub.WatchRevocations(request, metadata=self._metadata)
                self._call = call
            threading.Thread(
                target=self._probe, args=(stream, call), name="tokensvc-revocation-probe"
            ).start()
            try:
                call.initial_metadata()
                if call.is_active():  # headers, not a trailers-only refusal
                    core.on_connected(stream)
                for event in call:
                    if not core.on_event(stream, event):
                        why = "the server's history went backwards"
                        break
            except grpc.RpcError as err:
                why = _describe(err)
            except Exception as err:  # a bug must not end the feed silently
                log.exception("revocation feed failed")
                why = _describe(err)
            finally:
                with self._lock:
                    self._call = None
                call.cancel()
            delay = core.end(stream, why, closing=self._closed.is_set())
            self._closed.wait(delay)


class AioRevocationFeed(_FeedBase):
    """The revocation feed over a ``grpc.aio`` channel, consumed by an asyncio task.

    Arguments as for :class:`RevocationFeed`. :meth:`start` must be called with the event
    loop running (the loop of the channel and of the server); :meth:`close` is a
    coroutine. Also an async context manager.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        max_staleness: float = 60.0,
        fail_closed: bool = False,
        backoff: tuple[float, float] = (0.1, 5.0),
        clock: Callable[[], float] = time.time,
        metadata: Sequence[tuple[str, str]] = (),
        revocations: RevocationSet | None = None,
    ) -> None:
        self._core = _FeedCore(
            max_staleness=max_staleness,
            fail_closed=fail_closed,
            backoff=backoff,
            clock=clock,
            revocations=revocations,
        )
        self._channel = channel
        self._stub = tokensvc_pb2_grpc.TokenServiceStub(channel)
        self._metadata = tuple(metadata)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> AioRevocationFeed:
        """Start consuming the stream on the running loop (once); returns the feed."""
        if self._closed:
            raise RuntimeError("revocation feed closed")
        if self._task is None:
            self._core.restart_clock()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="tokensvc-revocation-feed"
            )
        return self

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the stream is up; whether it is."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._core.connected:
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        """Stop the stream and its task (the channel stays open)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> AioRevocationFeed:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _probe(self, stream: int, call: Any) -> None:
        core = self._core
        while True:
            await asyncio.sleep(core.settle / 2)
            ready = self._channel.get_state() is grpc.ChannelConnectivity.READY
            if core.settled(stream, not call.done(), ready):
                return

    async def _run(self) -> None:
        core = self._core
        while True:
            why = "stream ended"
            stream, request = core.begin()
            call = self._stub.WatchRevocations(request, metadata=self._metadata)
            probe = asyncio.create_task(self._probe(stream, call))
            try:
                await call.initial_metadata()
                if not call.done():  # headers, not a trailers-only refusal
                    core.on_connected(stream)
                async for event in call:
                    if not core.on_event(stream, event):
                        why = "the server's history went backwards"
                        break
            except grpc.RpcError as err:
                why = _describe(err)
            except asyncio.CancelledError:
                core.end(stream, "cancelled", closing=True)
                raise
            except Exception as err:  # a bug must not end the feed silently
                log.exception("revocation feed failed")
                why = _describe(err)
            finally:
                probe.cancel()
                call.cancel()
            await asyncio.sleep(core.end(stream, why))
