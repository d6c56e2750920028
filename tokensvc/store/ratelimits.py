"""Rate limits kept in Redis: GCRA state per subject (inside Issue's script) and per peer."""

from __future__ import annotations

from dataclasses import dataclass

from tokensvc.redis.lean import Script
from tokensvc.store.calls import guarded
from tokensvc.store.core import StoreCore


@dataclass(frozen=True, slots=True)
class Limit:
    """A rate limit in the scripts' terms: GCRA emission interval and burst tolerance, µs."""

    interval_us: int = 0
    tolerance_us: int = 0

    @classmethod
    def of(cls, count: int, period_s: int) -> Limit:
        if count <= 0:
            return cls()
        return cls(max(1, period_s * 1_000_000 // count), period_s * 1_000_000)

    @property
    def enabled(self) -> bool:
        return self.interval_us > 0


NO_LIMIT = Limit()


class LimitOps(StoreCore):
    """Counting events against a limiter key (see :func:`tokensvc.store.peer_limit_key`)."""

    _rate: Script

    def _register_scripts(self) -> None:
        super()._register_scripts()
        self._rate = self._register("ratelimit.lua", gcra=True)

    async def hit(self, key: str, limit: Limit) -> int:
        """Count one event against a limiter; 0 if allowed, else ms to wait."""
        if not limit.enabled:
            return 0
        return int(
            await guarded(self._rate, keys=[key], args=[limit.interval_us, limit.tolerance_us])
        )
