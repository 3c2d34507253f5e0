"""Who is connected where: the in-process presence registry (embedded default).

A device has at most one message-receiving socket; a newer one displaces the older (4409). Long-polls
wait here too, without displacing anything. Cluster mode extends this registry with Redis
(:mod:`mailslot.backends.redis.presence`): the same calls, plus wake-ups and displacement across nodes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

DeviceKey = tuple[uuid.UUID, int]


@dataclass(slots=True)
class Outgoing:
    """An envelope ready to push: ``envelope`` is the serialized Envelope as the client receives it."""

    id: int  # the queue row id; negative for ephemeral messages that were never stored
    guid: uuid.UUID
    envelope: bytes
    story: bool = False
    # Read back from the queue (the device was away when it was stored), rather than handed over live.
    queued: bool = False


class DeviceListener(Protocol):
    def notify(self, messages: Sequence[Outgoing] | None) -> None:
        """New messages for the device: handed over in memory, or None for "read your queue"."""
        ...

    async def displace(self, code: int, reason: str) -> None:
        """Close the connection (4409: connected elsewhere; 4401: credentials changed)."""
        ...


class LocalPresence:
    def __init__(self) -> None:
        self._listeners: dict[DeviceKey, DeviceListener] = {}
        self._waiters: dict[DeviceKey, set[asyncio.Event]] = {}

    def register(self, key: DeviceKey, listener: DeviceListener) -> DeviceListener | None:
        """Make ``listener`` the device's receiver; returns the one it replaced (to be displaced)."""
        previous = self._listeners.get(key)
        self._listeners[key] = listener
        return previous if previous is not listener else None

    def unregister(self, key: DeviceKey, listener: DeviceListener) -> None:
        if self._listeners.get(key) is listener:
            del self._listeners[key]

    def is_present(self, key: DeviceKey) -> bool:
        return key in self._listeners

    def listener(self, key: DeviceKey) -> DeviceListener | None:
        return self._listeners.get(key)

    def notify(self, key: DeviceKey, messages: Sequence[Outgoing] | None) -> None:
        listener = self._listeners.get(key)
        if listener is not None:
            listener.notify(messages)
        for event in self._waiters.get(key, ()):
            event.set()

    def add_waiter(self, key: DeviceKey) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        return event

    def remove_waiter(self, key: DeviceKey, event: asyncio.Event) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[key]

    def listeners_of(self, aci: uuid.UUID, device_ids: Sequence[int] | None) -> list[DeviceListener]:
        return [
            listener
            for (owner, device_id), listener in list(self._listeners.items())
            if owner == aci and (device_ids is None or device_id in device_ids)
        ]

    async def settle(self, key: DeviceKey) -> None:
        """Wait until wake-ups for ``key`` reach this process (at once here; a subscription in a cluster)."""

    async def disconnect(self, aci: uuid.UUID, device_ids: Sequence[int] | None, code: int, reason: str) -> None:
        """Close the account's (or the listed devices') sockets, wherever they are."""
        for listener in self.listeners_of(aci, device_ids):
            await listener.displace(code, reason)

    def might_be_present(self, key: DeviceKey) -> bool:
        """Whether an ephemeral message could reach the device: connected here (or, in a cluster, maybe
        connected to another node)."""
        return key in self._listeners
