"""Device linking across nodes: provisioning addresses and link waits over Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from redis.exceptions import RedisError

from mailslot.backends.redis.bus import RedisBus
from mailslot.services.devices import LINKED_INFO_SECONDS, Deliver, ProvisioningRegistry
from mailslot.services.errors import ServiceError

log = logging.getLogger("mailslot.cluster")


class ClusterProvisioning(ProvisioningRegistry):
    """Each provisioning socket also listens on ``prov:<address>``; a message for an address held by
    another node is published there. As in Signal's server, the sender's 200 then means "a socket
    is listening", not "the device answered"."""

    def __init__(self, bus: RedisBus) -> None:
        super().__init__()
        self.bus = bus
        self._handles: dict[str, int] = {}
        self._tasks: set[asyncio.Task[bool]] = set()

    def _channel(self, address: str) -> str:
        return self.bus.channel("prov", address)

    def new_address(self, deliver: Deliver) -> str:
        address = super().new_address(deliver)
        self._handles[address] = self.bus.subscribe(self._channel(address), lambda data: self._arrived(deliver, data))
        return address

    def _arrived(self, deliver: Deliver, envelope: bytes) -> None:
        task = asyncio.ensure_future(deliver(envelope))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, address: str) -> None:
        await self.bus.ready(self._channel(address))

    def release(self, address: str) -> None:
        super().release(address)
        handle = self._handles.pop(address, None)
        if handle is not None:
            self.bus.unsubscribe(self._channel(address), handle)

    async def forward(self, address: str, envelope: bytes) -> bool:
        if address in self._listeners:
            return await super().forward(address, envelope)
        try:
            return await self.bus.publish(self._channel(address), envelope) > 0
        except (RedisError, OSError, TimeoutError):
            log.warning("Redis unavailable: a provisioning message for another node cannot be delivered")
            return False


class RedisLinkWaits:
    """A linked device's info is kept under ``linked:<tokenIdentifier>`` for an hour and announced on a
    channel of the same name, so the primary's wait may run on any node."""

    def __init__(self, bus: RedisBus) -> None:
        self.bus = bus

    def _name(self, identifier: str) -> str:
        return self.bus.channel("linked", identifier)

    async def announce(self, identifier: str, info: dict[str, Any]) -> None:
        name = self._name(identifier)
        data = json.dumps(info).encode()
        try:
            async with asyncio.timeout(2.0):
                await self.bus.client.set(name, data, ex=LINKED_INFO_SECONDS)
                await self.bus.publish(name, data)
        except (RedisError, OSError, TimeoutError):
            # The device is linked; only the primary's wait for it misses the news.
            log.warning("Redis unavailable: a linked device could not be announced")

    async def wait(self, identifier: str, wait_seconds: float) -> dict[str, Any] | None:
        name = self._name(identifier)
        arrived: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_message(data: bytes) -> None:
            if not arrived.done():
                arrived.set_result(data)

        handle = self.bus.subscribe(name, on_message)
        try:
            await self.bus.ready(name)
            try:
                async with asyncio.timeout(2.0):
                    stored = await self.bus.client.get(name)
            except (RedisError, OSError, TimeoutError) as exc:
                raise ServiceError(503, "unavailable", "linked devices cannot be looked up right now") from exc
            if stored is not None:
                return dict(json.loads(stored))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_seconds):
                    return dict(json.loads(await arrived))
            return None
        finally:
            self.bus.unsubscribe(name, handle)
