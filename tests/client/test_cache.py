"""The one bounded map of the library and the server (tokensvc_client.cache.BoundedCache)."""

from __future__ import annotations

import threading

from tokensvc_client.cache import BoundedCache


def test_the_oldest_entry_goes_first_and_a_hit_does_not_keep_one():
    cache: BoundedCache[str, int] = BoundedCache(3)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert cache.get("a") == 0  # no recency: "a" is still the oldest
    cache.put("d", 3)
    assert "a" not in cache
    assert [cache.get(k) for k in "bcd"] == [1, 2, 3]
    assert len(cache) == 3
    assert cache.oldest() == ("b", 1)


def test_putting_an_existing_key_replaces_it_as_the_newest_without_dropping_another():
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    assert len(cache) == 2 and cache.oldest() == ("b", 2)
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 10


def test_none_values_defaults_pop_and_an_empty_cache():
    cache: BoundedCache[str, int | None] = BoundedCache(2)
    assert cache.oldest() is None and cache.get("x", -1) == -1
    cache.put("x", None)
    cache.put("x", None)  # a stored None still counts as present
    assert len(cache) == 1 and "x" in cache and cache.get("x", -1) is None
    assert cache.pop("x", -1) is None and cache.pop("x", -1) == -1
    nothing: BoundedCache[str, int] = BoundedCache(0)
    nothing.put("a", 1)
    assert len(nothing) == 0 and nothing.size == 0


def test_racing_threads_never_raise_and_stay_near_the_bound():
    cache: BoundedCache[tuple[int, int], int] = BoundedCache(64)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20_000):
                cache.put((n, i), i)
                cache.get((n, i - 1))
                cache.oldest()
        except BaseException as err:  # pragma: no cover -- reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 64 + len(threads)
