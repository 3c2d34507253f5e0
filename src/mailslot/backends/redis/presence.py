"""Presence across nodes: the local registry plus per-device Redis channels.

A node subscribes to ``dev:<aci>:<device>`` while it holds that device's socket or a long-poll for it,
and to ``acct:<aci>`` while it holds any socket of the account. A message stored for a device with no
socket on this node is published on the device's channel with its row id and envelope, so the node
that holds the socket hands it over in memory, as the embedded default does; ephemeral messages travel
the same way and are never stored. A new socket takes a ticket from a Redis counter and announces it
on the channel: an older socket elsewhere (smaller ticket) closes with 4409.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any

from redis.exceptions import RedisError

from mailslot.backends.redis.bus import RedisBus
from mailslot.services.presence import DeviceKey, DeviceListener, LocalPresence, Outgoing

log = logging.getLogger("mailslot.cluster")

_MESSAGE = b"m"
_DISPLACE = b"d"
_DISCONNECT = b"x"
_HEADER = struct.Struct(">q16s?")
_TICKET = struct.Struct(">q")


def encode_message(message: Outgoing) -> bytes:
    return _MESSAGE + _HEADER.pack(message.id, message.guid.bytes, message.story) + message.envelope


def decode_message(data: bytes) -> Outgoing:
    row_id, guid, story = _HEADER.unpack_from(data, 1)
    return Outgoing(row_id, uuid.UUID(bytes=guid), data[1 + _HEADER.size:], story)


class ClusterPresence(LocalPresence):
    def __init__(self, bus: RedisBus, sweep_seconds: float = 30.0) -> None:
        super().__init__()
        self.bus = bus
        self.sweep_seconds = sweep_seconds
        # device → (subscription handle, number of local users: socket and long-polls)
        self._device_subs: dict[DeviceKey, tuple[int, int]] = {}
        self._account_subs: dict[uuid.UUID, tuple[int, int]] = {}
        self._tickets: dict[DeviceKey, int] = {}
        self._newest_seen: dict[DeviceKey, int] = {}
        self._claims: dict[DeviceKey, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._ephemeral_ids = -(1 << 48)
        bus.on_reconnect.append(self.wake_all)

    def start(self) -> None:
        if self.sweep_seconds > 0:
            self._sweeper = asyncio.create_task(self._sweep(), name="mailslot-presence-sweep")

    async def close(self) -> None:
        tasks = [*self._claims.values(), *self._background]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- channels ---------------------------------------------------------------------------------

    def _device_channel(self, key: DeviceKey) -> str:
        return self.bus.channel("dev", str(key[0]), str(key[1]))

    def _account_channel(self, aci: uuid.UUID) -> str:
        return self.bus.channel("acct", str(aci))

    def _hold_device(self, key: DeviceKey) -> None:
        handle, users = self._device_subs.get(key, (0, 0))
        if users == 0:
            handle = self.bus.subscribe(self._device_channel(key), lambda data: self._on_device(key, data))
        self._device_subs[key] = (handle, users + 1)

    def _release_device(self, key: DeviceKey) -> None:
        handle, users = self._device_subs.get(key, (0, 0))
        if users <= 1:
            self._device_subs.pop(key, None)
            self.bus.unsubscribe(self._device_channel(key), handle)
            self._newest_seen.pop(key, None)
        else:
            self._device_subs[key] = (handle, users - 1)

    def _hold_account(self, aci: uuid.UUID) -> None:
        handle, users = self._account_subs.get(aci, (0, 0))
        if users == 0:
            handle = self.bus.subscribe(self._account_channel(aci), lambda data: self._on_account(aci, data))
        self._account_subs[aci] = (handle, users + 1)

    def _release_account(self, aci: uuid.UUID) -> None:
        handle, users = self._account_subs.get(aci, (0, 0))
        if users <= 1:
            self._account_subs.pop(aci, None)
            self.bus.unsubscribe(self._account_channel(aci), handle)
        else:
            self._account_subs[aci] = (handle, users - 1)

    # -- sockets ----------------------------------------------------------------------------------

    def register(self, key: DeviceKey, listener: DeviceListener) -> DeviceListener | None:
        previous = super().register(key, listener)
        if previous is None:
            self._hold_device(key)
            self._hold_account(key[0])
        self._tickets.pop(key, None)
        old = self._claims.pop(key, None)
        if old is not None:
            old.cancel()
        self._claims[key] = asyncio.create_task(self._claim(key, listener))
        return previous

    def unregister(self, key: DeviceKey, listener: DeviceListener) -> None:
        if self._listeners.get(key) is not listener:
            return
        super().unregister(key, listener)
        self._tickets.pop(key, None)
        claim = self._claims.pop(key, None)
        if claim is not None:
            claim.cancel()
        self._release_device(key)
        self._release_account(key[0])

    async def _claim(self, key: DeviceKey, listener: DeviceListener) -> None:
        """Subscribe, take a ticket, and tell older sockets of the device on other nodes to go."""
        await self.bus.ready(self._device_channel(key))
        try:
            async with asyncio.timeout(2.0):
                ticket = int(await self.bus.client.incr(self.bus.channel("presence-ticket")))
                await self.bus.publish(self._device_channel(key), _DISPLACE + _TICKET.pack(ticket))
        except (RedisError, OSError, TimeoutError):
            log.warning("Redis unavailable: a socket on another node may stay open until it reconnects")
            return
        if self._listeners.get(key) is not listener:
            return
        self._tickets[key] = ticket
        if self._newest_seen.get(key, 0) > ticket:
            # A newer socket elsewhere announced itself while our ticket was on its way.
            self._spawn(self._displace_local(key, listener))

    async def settle(self, key: DeviceKey) -> None:
        claim = self._claims.get(key)
        if claim is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(claim)
        else:
            await self.bus.ready(self._device_channel(key))

    def might_be_present(self, key: DeviceKey) -> bool:
        return True  # possibly connected to another node: the channel reaches it if so

    def notify(self, key: DeviceKey, messages: Sequence[Outgoing] | None) -> None:
        local = key in self._listeners
        super().notify(key, messages)
        if local:
            return
        channel = self._device_channel(key)
        if messages is None:
            self.bus.publish_later(channel, _MESSAGE + _HEADER.pack(0, bytes(16), False))
            return
        for message in messages:
            self.bus.publish_later(channel, encode_message(message))

    async def disconnect(self, aci: uuid.UUID, device_ids: Sequence[int] | None, code: int, reason: str) -> None:
        await super().disconnect(aci, device_ids, code, reason)
        try:
            await self.bus.publish(self._account_channel(aci), _DISCONNECT + bytes(device_ids or ()))
        except (RedisError, OSError, TimeoutError):
            log.warning("Redis unavailable: sockets of a changed account on other nodes stay open")

    # -- long-polls -------------------------------------------------------------------------------

    def add_waiter(self, key: DeviceKey) -> asyncio.Event:
        self._hold_device(key)
        return super().add_waiter(key)

    def remove_waiter(self, key: DeviceKey, event: asyncio.Event) -> None:
        super().remove_waiter(key, event)
        self._release_device(key)

    # -- what other nodes tell us -----------------------------------------------------------------

    def _on_device(self, key: DeviceKey, data: bytes) -> None:
        kind = data[:1]
        if kind == _MESSAGE:
            message = decode_message(data)
            if message.id == 0 and not message.envelope:
                LocalPresence.notify(self, key, None)
                return
            if message.id < 0:
                # Ephemeral ids are counted per node; give it one of ours so it cannot collide.
                self._ephemeral_ids -= 1
                message.id = self._ephemeral_ids
            LocalPresence.notify(self, key, [message])
        elif kind == _DISPLACE and len(data) == 1 + _TICKET.size:
            (ticket,) = _TICKET.unpack_from(data, 1)
            self._newest_seen[key] = max(ticket, self._newest_seen.get(key, 0))
            mine = self._tickets.get(key)
            listener = self._listeners.get(key)
            if listener is not None and mine is not None and mine < ticket:
                self._spawn(self._displace_local(key, listener))

    def _on_account(self, aci: uuid.UUID, data: bytes) -> None:
        if data[:1] != _DISCONNECT:
            return
        device_ids = list(data[1:]) or None
        self._spawn(LocalPresence.disconnect(self, aci, device_ids, 4401, "Reauthentication required"))

    async def _displace_local(self, key: DeviceKey, listener: DeviceListener) -> None:
        if self._listeners.get(key) is listener:
            await listener.displace(4409, "Connected elsewhere")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- making up for lost wake-ups ------------------------------------------------------------

    def wake_all(self) -> None:
        """Every local socket reads its queue and every long-poll looks again (after Redis was away)."""
        for key in list(self._listeners):
            LocalPresence.notify(self, key, None)
        for key in list(self._waiters):
            LocalPresence.notify(self, key, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            for key in list(self._listeners):
                LocalPresence.notify(self, key, None)
