"""The Group-Auth replay cache of one process (embedded default)."""

from __future__ import annotations

import time
from collections.abc import Callable


class MemoryReplayCache:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_entries: int = 1_000_000) -> None:
        self._seen: dict[bytes, float] = {}
        self._clock = clock
        self._max = max_entries

    async def first_use(self, token: bytes, ttl_seconds: int) -> bool:
        now = self._clock()
        expires = self._seen.get(token)
        if expires is not None and expires > now:
            return False
        if len(self._seen) >= self._max:
            self._seen = {k: v for k, v in self._seen.items() if v > now}
            if len(self._seen) >= self._max:
                # Refuse rather than forget: a forgotten signature could be replayed.
                return False
        self._seen[token] = now + ttl_seconds
        return True
