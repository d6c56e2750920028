"""One bounded map for everything worth remembering per exact input, client and server.

:class:`BoundedCache` keeps at most ``size`` entries and drops the oldest one first (the
one put longest ago): O(1) per operation, on a plain dict (dicts keep insertion order).
There is no recency: a hit does not keep an entry (that is ``functools.lru_cache``, which
the pure functions memoised across the library use). Entries that expire on their own
(the web helper's refresh memory) are dropped with :meth:`BoundedCache.oldest` and
:meth:`BoundedCache.pop` as their time comes.

It takes no lock. Blocking interceptors share one from several threads: a racing thread
at worst drops one entry more than needed, never raises and never grows the map past
``size`` plus the number of racing threads.

A public module so that the server (which imports only public client modules) uses the
same type for its own bounded maps (the admission guard's local blocks).
"""

from __future__ import annotations

import contextlib
from typing import Generic, TypeVar, overload

__all__ = ["BoundedCache"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")
_ABSENT = object()


class BoundedCache(Generic[K, V]):
    """A map of at most ``size`` entries (``size <= 0``: remembers nothing); putting into a
    full map drops its oldest entry; putting an existing key replaces its value and makes
    it the newest."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: dict[K, V] = {}

    @property
    def size(self) -> int:
        """The most entries kept."""
        return self._size

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...
    def get(self, key: K, default: object = None) -> object:
        """The value of ``key``, else ``default``."""
        return self._entries.get(key, default)

    def put(self, key: K, value: V) -> None:
        """Remember ``value`` for ``key`` as the newest entry, dropping the oldest if full."""
        if self._size <= 0:
            return
        entries = self._entries
        if entries.pop(key, _ABSENT) is _ABSENT and len(entries) >= self._size:
            # a racing thread may have changed the map or dropped that entry already
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                del entries[next(iter(entries))]
        entries[key] = value

    @overload
    def pop(self, key: K) -> V | None: ...
    @overload
    def pop(self, key: K, default: D) -> V | D: ...
    def pop(self, key: K, default: object = None) -> object:
        """Forget ``key``; its value, else ``default``."""
        return self._entries.pop(key, default)

    def oldest(self) -> tuple[K, V] | None:
        """The oldest entry, ``None`` when empty."""
        with contextlib.suppress(RuntimeError, StopIteration, KeyError):
            key = next(iter(self._entries))
            return key, self._entries[key]
        return None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
