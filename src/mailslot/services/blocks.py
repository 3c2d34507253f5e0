"""Blocking identified senders (GROUPS.md "Blocking").

Each account has a random 32-byte block key, stored sealed under the server's at-rest keyring; a
block is stored as HMAC-SHA256(block key, blocked service id), so a database dump without the
configuration holds no readable block list. An identified send from a blocked sender is answered as
usual and delivers nothing (no delivery receipt either). Block lists are read through a short cache
that writes on this node clear at once and, in a cluster, on every node (the bus).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
import uuid
from collections.abc import Awaitable, Callable

from mailslot.crypto.atrest import AtRestKeyring
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError
from mailslot.services.keys import ServiceId
from mailslot.stores.blocks import BlockStore


def _service_id_text(service_id: ServiceId) -> str:
    return f"PNI:{service_id.uuid}" if service_id.is_pni else str(service_id.uuid)


class BlockService:
    def __init__(self, store: BlockStore, keyring: AtRestKeyring, cache_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.keyring = keyring
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[uuid.UUID, tuple[float, bytes | None, frozenset[bytes]]] = {}
        self._loading: dict[uuid.UUID, asyncio.Future[tuple[float, bytes | None, frozenset[bytes]]]] = {}
        self._generation = 0
        # Told after each write (cluster mode: every node drops its cached copy before we answer).
        self.publishers: list[Callable[[uuid.UUID], Awaitable[None]]] = []

    @staticmethod
    def _ad(aci: uuid.UUID) -> bytes:
        return b"mailslot-block-key-v1" + aci.bytes

    async def _key(self, aci: uuid.UUID, create: bool) -> bytes | None:
        sealed = await self.store.get_key(aci)
        if sealed is None:
            if not create:
                return None
            sealed = await self.store.put_key(aci, self.keyring.seal(os.urandom(32), self._ad(aci)))
        return self.keyring.open(sealed, self._ad(aci))

    @staticmethod
    def token(key: bytes, service_id_text: str) -> bytes:
        return hmac.new(key, service_id_text.encode(), hashlib.sha256).digest()

    def invalidate(self, aci: uuid.UUID) -> None:
        self._cache.pop(aci, None)
        self._loading.pop(aci, None)  # later sends must not join a read that started before the change
        self._generation += 1

    async def _written(self, aci: uuid.UUID) -> None:
        self.invalidate(aci)
        for publish in self.publishers:
            await publish(aci)

    async def _change(self, principal: Principal, target: str, block: bool) -> None:
        service_id = ServiceId.parse(target)
        if service_id is None:
            raise ServiceError(400, "bad_request", "serviceId: must be an ACI or PNI:<uuid>")
        key = await self._key(principal.aci, create=block)
        if key is None:
            return  # nothing was ever blocked
        token = self.token(key, _service_id_text(service_id))
        try:
            if block:
                await self.store.add(principal.aci, token)
            else:
                await self.store.remove(principal.aci, token)
        finally:
            await self._written(principal.aci)

    async def block(self, principal: Principal, target: str) -> None:
        await self._change(principal, target, True)

    async def unblock(self, principal: Principal, target: str) -> None:
        await self._change(principal, target, False)

    async def is_blocked(self, recipient: uuid.UUID, sender_aci: uuid.UUID, sender_pni: uuid.UUID | None) -> bool:
        entry = self._cache.get(recipient)
        if entry is None or entry[0] <= self._clock():
            entry = await self._load(recipient)
        _, key, tokens = entry
        if key is None or not tokens:
            return False
        if self.token(key, str(sender_aci)) in tokens:
            return True
        return sender_pni is not None and self.token(key, f"PNI:{sender_pni}") in tokens

    async def _load(self, recipient: uuid.UUID) -> tuple[float, bytes | None, frozenset[bytes]]:
        """One read per recipient at a time: the sends that find the entry expired together share it."""
        loading = self._loading.get(recipient)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[tuple[float, bytes | None, frozenset[bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._loading[recipient] = future
        generation = self._generation
        try:
            key = await self._key(recipient, create=False)
            tokens = frozenset(await self.store.tokens(recipient)) if key is not None else frozenset()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            if self._loading.get(recipient) is future:
                del self._loading[recipient]
        entry = (self._clock() + self.cache_seconds, key, tokens)
        future.set_result(entry)
        if len(self._cache) > 100_000:
            self._cache.clear()
        if generation == self._generation:  # no block or unblock here overtook this read
            self._cache[recipient] = entry
        return entry
