"""Periodic purge of data whose time is up (verification sessions, spent refresh tokens)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("mailslot.retention")

Purge = Callable[[int], Awaitable[int]]


class RetentionJob:
    """Runs every registered purge (``now -> rows deleted``) once per interval, until stopped."""

    def __init__(self, interval_seconds: float = 600.0) -> None:
        self.interval = interval_seconds
        self.purges: dict[str, Purge] = {}
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> dict[str, int]:
        now = int(time.time())
        deleted: dict[str, int] = {}
        for name, purge in self.purges.items():
            try:
                deleted[name] = await purge(now)
            except Exception:
                log.exception("purge failed", extra={"purge": name})
        if any(deleted.values()):
            log.info("purged expired data", extra={"deleted": deleted})
        return deleted

    async def _loop(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="mailslot-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
