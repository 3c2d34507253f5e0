"""Token buckets in Redis, shared by every node: one atomic Lua script per take.

The script reads Redis's own clock, so nodes with skewed clocks share one notion of time. If Redis
cannot be reached the node falls back to its own in-process buckets (limits then hold per node, not per
cluster) rather than refuse or admit everything.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mailslot.backends.memory.ratelimit import MemoryRateLimitBackend

log = logging.getLogger("mailslot.cluster")

# KEYS: buckets; ARGV: capacity, seconds per permit, permits for each bucket in turn. Takes from each
# bucket in order and stops at the first that cannot give: returns "" when all gave, else
# "<1-based index>:<wait seconds>" (as a string: Lua numbers would be truncated in the reply).
TAKE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[3 * i - 2])
  local per_permit = tonumber(ARGV[3 * i - 1])
  local permits = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(state[1])
  local at = tonumber(state[2])
  if tokens == nil or at == nil or per_permit <= 0 then
    tokens = capacity
  else
    tokens = math.min(capacity, tokens + math.max(0, now - at) / per_permit)
  end
  local enough = tokens >= permits
  if enough then
    tokens = tokens - permits
  end
  if tokens >= capacity then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('PEXPIRE', key, math.ceil((capacity - tokens) * per_permit * 1000) + 1000)
  end
  if not enough then
    return tostring(i) .. ':' .. tostring((permits - tokens) * per_permit)
  end
end
return ''
"""


class RedisRateLimitBackend:
    """Implements :class:`mailslot.stores.interfaces.RateLimitBackend` over a shared Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str, fallback: MemoryRateLimitBackend | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.fallback = fallback or MemoryRateLimitBackend()
        self._script = client.register_script(TAKE_SCRIPT)
        self._warned_at = 0.0

    def _key(self, key: str) -> str:
        return f"{self.prefix}:rl:{key}"

    async def take(self, key: str, capacity: float, permit_seconds: float, permits: float) -> float | None:
        refused = await self.take_many([(key, capacity, permit_seconds, permits)])
        return None if refused is None else refused[1]

    async def take_many(self, buckets: list[tuple[str, float, float, float]]) -> tuple[int, float] | None:
        keys = [self._key(key) for key, _, _, _ in buckets]
        args = [value for _, capacity, per, permits in buckets for value in (capacity, per, permits)]
        try:
            async with asyncio.timeout(1.0):
                reply = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._warn(exc)
            return await self.fallback.take_many(buckets)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        if not text:
            return None
        index, _, wait = text.partition(":")
        return int(index) - 1, float(wait)

    async def reset(self, key: str) -> None:
        await self.fallback.reset(key)
        try:
            async with asyncio.timeout(1.0):
                await self.client.delete(self._key(key))
        except (RedisError, OSError, TimeoutError) as exc:
            self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning("Redis unavailable for rate limits (%s); limiting per node", type(exc).__name__)
