"""Interceptor rows (filled in once the interceptor exists)."""

from typing import Any


def run(b: Any, redis_url: str, data_dir: Any) -> None:
    return None
