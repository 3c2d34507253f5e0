"""Named token-bucket limiters (digest §11) over a pluggable bucket backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mailslot.config import RateLimitSettings
from mailslot.stores.interfaces import RateLimitBackend


@dataclass(frozen=True, slots=True)
class Limit:
    capacity: float
    permit_seconds: float


# Defaults of Signal's reference server for the limiters this server uses.
DEFAULT_LIMITS: dict[str, Limit] = {
    "messages": Limit(60, 1.0),
    "inboundMessageBytes": Limit(128 * 1024 * 1024, 0.0005),
    "stories": Limit(5000, 8.0),
    "prekeys": Limit(6, 600.0),
    "profile": Limit(4320, 20.0),
    "attachmentCreate": Limit(50, 1.2),
    "attachmentCreateBytes": Limit(1_000_000_000, 0.000001),
    "allocateDevice": Limit(6, 120.0),
    "verifyDevice": Limit(6, 120.0),
    "waitForLinkedDevice": Limit(10, 30.0),
    "registration": Limit(6, 30.0),
    "pin": Limit(10, 86400.0),
    "checkTotp": Limit(5, 6.0),
    "verificationPushChallenge": Limit(5, 30.0),
    "verificationCaptcha": Limit(10, 30.0),
    "checkAccountExistence": Limit(1000, 4.0),
    # Not in the reference server (its registration service limits these internally): sessions
    # created per client IP, and per number.
    "verificationSessionPerIp": Limit(20, 60.0),
    "verificationSessionPerNumber": Limit(10, 300.0),
    "authSession": Limit(30, 10.0),
}


class RateLimitExceeded(Exception):
    def __init__(self, limiter: str, retry_after: float | None) -> None:
        super().__init__(f"rate limit {limiter} exceeded")
        self.limiter = limiter
        self.retry_after = retry_after

    @property
    def retry_after_seconds(self) -> int | None:
        return None if self.retry_after is None else max(1, math.ceil(self.retry_after))


class RateLimiters:
    def __init__(self, backend: RateLimitBackend, overrides: dict[str, RateLimitSettings]) -> None:
        self.backend = backend
        self.limits = dict(DEFAULT_LIMITS)
        for name, cfg in overrides.items():
            self.limits[name] = Limit(cfg.capacity, cfg.permit_seconds)

    async def check(self, limiter: str, key: str, permits: float = 1) -> None:
        """Take permits or raise :class:`RateLimitExceeded` with the wait until they would be there."""
        limit = self.limits[limiter]
        if permits > limit.capacity:
            raise RateLimitExceeded(limiter, None)
        wait = await self.backend.take(f"{limiter}::{key}", limit.capacity, limit.permit_seconds, permits)
        if wait is not None:
            raise RateLimitExceeded(limiter, wait)

    async def check_many(self, checks: list[tuple[str, str, float]]) -> None:
        """Several ``check`` calls in order, in one backend round trip: (limiter, key, permits)."""
        buckets = []
        for limiter, key, permits in checks:
            limit = self.limits[limiter]
            if permits > limit.capacity:
                raise RateLimitExceeded(limiter, None)
            buckets.append((f"{limiter}::{key}", limit.capacity, limit.permit_seconds, permits))
        if not buckets:
            return
        refused = await self.backend.take_many(buckets)
        if refused is not None:
            raise RateLimitExceeded(checks[refused[0]][0], refused[1])

    async def reset(self, limiter: str, key: str) -> None:
        await self.backend.reset(f"{limiter}::{key}")
