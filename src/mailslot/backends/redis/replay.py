"""The Group-Auth replay cache shared by all nodes: ``SET NX EX`` per signature."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mailslot.services.errors import ServiceError


class RedisReplayCache:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def first_use(self, token: bytes, ttl_seconds: int) -> bool:
        try:
            async with asyncio.timeout(1.0):
                created = await self.client.set(f"{self.prefix}:replay:{token.hex()}", b"1", nx=True, ex=ttl_seconds)
        except (RedisError, OSError, TimeoutError) as exc:
            # Without the shared cache a replay on another node could not be caught: refuse instead.
            raise ServiceError(503, "unavailable", "group requests cannot be checked right now") from exc
        return bool(created)
