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

# KEYS[1] bucket; ARGV capacity, seconds per permit, permits. Returns "" when taken, else the wait in
# seconds as a string (Lua numbers would be truncated to integers in the reply).
TAKE_SCRIPT = """
local capacity = tonumber(ARGV[1])
local per_permit = tonumber(ARGV[2])
local permits = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
elseif per_permit <= 0 then
  tokens = capacity
else
  tokens = math.min(capacity, tokens + math.max(0, now - at) / per_permit)
end
if tokens >= permits then
  tokens = tokens - permits
  if tokens >= capacity then
    redis.call('DEL', KEYS[1])
  else
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) * per_permit * 1000) + 1000)
  end
  return ''
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) * per_permit * 1000) + 1000)
return tostring((permits - tokens) * per_permit)
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
        try:
            async with asyncio.timeout(1.0):
                reply = await self._script(keys=[self._key(key)], args=[capacity, permit_seconds, permits])
        except (RedisError, OSError, TimeoutError) as exc:
            self._warn(exc)
            return await self.fallback.take(key, capacity, permit_seconds, permits)
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        return float(text) if text else None

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
