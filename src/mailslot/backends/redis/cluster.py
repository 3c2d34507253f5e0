"""Everything cluster mode adds, built from ``[cluster]``: one bus and what runs over it."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from mailslot.backends.redis.bus import RedisBus, connect
from mailslot.backends.redis.devices import ClusterProvisioning, RedisLinkWaits
from mailslot.backends.redis.presence import ClusterPresence
from mailslot.backends.redis.ratelimit import RedisRateLimitBackend
from mailslot.backends.redis.replay import RedisReplayCache
from mailslot.config import ClusterSettings

log = logging.getLogger("mailslot.cluster")


class SharedCache(Protocol):
    write_listeners: list[Callable[[uuid.UUID], None]]

    def invalidate(self, aci: uuid.UUID) -> None: ...


class AwaitedCache(Protocol):
    """A cache whose writers wait until the other nodes have been told (block lists)."""

    publishers: list[Callable[[uuid.UUID], Awaitable[None]]]

    def invalidate(self, aci: uuid.UUID) -> None: ...


@dataclass
class Cluster:
    node_id: str
    bus: RedisBus
    presence: ClusterPresence
    provisioning: ClusterProvisioning
    link_waits: RedisLinkWaits
    rate_limits: RedisRateLimitBackend
    replay: RedisReplayCache

    def share_cache(self, name: str, cache: SharedCache) -> None:
        """Writes through ``cache`` on one node drop the entry from that cache on every node at once
        (not only after its TTL): account records, block lists."""
        channel = self.bus.channel("invalidate", name)

        def on_message(data: bytes) -> None:
            if len(data) == 16:
                cache.invalidate(uuid.UUID(bytes=data))

        self.bus.subscribe(channel, on_message)
        cache.write_listeners.append(lambda aci: self.bus.publish_later(channel, aci.bytes))

    def share_cache_awaited(self, name: str, cache: AwaitedCache) -> None:
        """As :meth:`share_cache`, but the write waits for the publish, so that the next request on
        any node sees the change."""
        channel = self.bus.channel("invalidate", name)

        def on_message(data: bytes) -> None:
            if len(data) == 16:
                cache.invalidate(uuid.UUID(bytes=data))

        async def publish(aci: uuid.UUID) -> None:
            try:
                await self.bus.publish(channel, aci.bytes)
            except (RedisError, OSError, TimeoutError):
                log.warning("Redis unavailable: other nodes see this change after their cache expires")

        self.bus.subscribe(channel, on_message)
        cache.publishers.append(publish)

    async def close(self) -> None:
        await self.presence.close()
        await self.bus.close()


async def open_cluster(settings: ClusterSettings) -> Cluster:
    node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    bus = await connect(settings.redis_url, settings.key_prefix)
    presence = ClusterPresence(bus, settings.sweep_seconds)
    presence.start()
    log.info("cluster mode", extra={"node_id": node_id})
    return Cluster(
        node_id=node_id,
        bus=bus,
        presence=presence,
        provisioning=ClusterProvisioning(bus),
        link_waits=RedisLinkWaits(bus),
        rate_limits=RedisRateLimitBackend(bus.client, settings.key_prefix),
        replay=RedisReplayCache(bus.client, settings.key_prefix),
    )
