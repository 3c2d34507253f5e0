"""In-process token buckets (embedded default and tests)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class MemoryRateLimitBackend:
    """Implements :class:`mailslot.stores.interfaces.RateLimitBackend` in one process.

    Buckets live in a dict: ``key -> (tokens, last_update)``; full buckets are dropped so the map only
    holds keys that were used recently.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 200_000) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_keys = max_keys
        self._now = clock

    async def take(self, key: str, capacity: float, permit_seconds: float, permits: float) -> float | None:
        now = self._now()
        tokens, updated = self._buckets.get(key, (capacity, now))
        rate = math.inf if permit_seconds <= 0 else 1.0 / permit_seconds
        tokens = min(capacity, tokens + (now - updated) * rate)
        if tokens >= permits:
            tokens -= permits
            if tokens >= capacity:
                self._buckets.pop(key, None)
            else:
                if len(self._buckets) >= self._max_keys:
                    self._evict(now)
                self._buckets[key] = (tokens, now)
            return None
        self._buckets[key] = (tokens, now)
        return (permits - tokens) * permit_seconds

    async def take_many(self, buckets: list[tuple[str, float, float, float]]) -> tuple[int, float] | None:
        for index, (key, capacity, permit_seconds, permits) in enumerate(buckets):
            wait = await self.take(key, capacity, permit_seconds, permits)
            if wait is not None:
                return index, wait
        return None

    async def reset(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _evict(self, now: float) -> None:
        # Drop the oldest half; a dropped bucket is treated as full, which errs on the side of serving.
        by_age = sorted(self._buckets.items(), key=lambda item: item[1][1])
        for key, _ in by_age[: len(by_age) // 2]:
            del self._buckets[key]
