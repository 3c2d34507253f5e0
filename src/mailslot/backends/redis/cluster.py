"""Everything cluster mode adds, built from ``[cluster]``: one bus and what runs over it."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import uuid
from dataclasses import dataclass

from mailslot.backends.memory.account_cache import CachedAccountStore
from mailslot.backends.redis.bus import RedisBus, connect
from mailslot.backends.redis.devices import ClusterProvisioning, RedisLinkWaits
from mailslot.backends.redis.presence import ClusterPresence
from mailslot.backends.redis.ratelimit import RedisRateLimitBackend
from mailslot.backends.redis.replay import RedisReplayCache
from mailslot.config import ClusterSettings

log = logging.getLogger("mailslot.cluster")


@dataclass
class Cluster:
    node_id: str
    bus: RedisBus
    presence: ClusterPresence
    provisioning: ClusterProvisioning
    link_waits: RedisLinkWaits
    rate_limits: RedisRateLimitBackend
    replay: RedisReplayCache

    def share_account_cache(self, cache: CachedAccountStore) -> None:
        """Writes on one node drop the account from every node's cache (not only after its 1 s TTL)."""
        channel = self.bus.channel("accounts")

        def on_message(data: bytes) -> None:
            if len(data) == 16:
                cache.invalidate(uuid.UUID(bytes=data))

        self.bus.subscribe(channel, on_message)
        cache.write_listeners.append(lambda aci: self.bus.publish_later(channel, aci.bytes))

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
