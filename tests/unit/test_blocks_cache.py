"""The block-list cache: one store read per recipient however many sends find it expired at once, and a
block or unblock is never overwritten by a read that started before it."""

from __future__ import annotations

import asyncio
import uuid

from mailslot.crypto.atrest import AtRestKeyring
from mailslot.services.blocks import BlockService


class SlowStore:
    def __init__(self) -> None:
        self.keys: dict[uuid.UUID, bytes] = {}
        self.blocked: dict[uuid.UUID, set[bytes]] = {}
        self.reads = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def get_key(self, aci: uuid.UUID) -> bytes | None:
        self.reads += 1
        return self.keys.get(aci)

    async def put_key(self, aci: uuid.UUID, sealed_key: bytes) -> bytes:
        return self.keys.setdefault(aci, sealed_key)

    async def tokens(self, aci: uuid.UUID) -> set[bytes]:
        snapshot = set(self.blocked.get(aci, set()))  # what the database held when the read began
        await self.gate.wait()
        return snapshot

    async def add(self, aci: uuid.UUID, token: bytes) -> None:
        self.blocked.setdefault(aci, set()).add(token)

    async def remove(self, aci: uuid.UUID, token: bytes) -> None:
        self.blocked.get(aci, set()).discard(token)


def service(store: SlowStore) -> BlockService:
    return BlockService(store, AtRestKeyring({1: bytes(32)}, 1), cache_seconds=60)


async def test_concurrent_checks_share_one_read() -> None:
    store = SlowStore()
    blocks = service(store)
    recipient, sender = uuid.uuid4(), uuid.uuid4()
    store.keys[recipient] = blocks.keyring.seal(bytes(32), blocks._ad(recipient))
    store.gate.clear()
    checks = [asyncio.ensure_future(blocks.is_blocked(recipient, sender, None)) for _ in range(200)]
    await asyncio.sleep(0.01)
    store.gate.set()
    assert await asyncio.gather(*checks) == [False] * 200
    assert store.reads == 1
    assert not await blocks.is_blocked(recipient, sender, None)
    assert store.reads == 1  # cached


async def test_a_block_during_a_read_is_not_overwritten_by_it() -> None:
    from mailslot.services.credentials import Principal
    from mailslot.stores.models import Account, Device

    store = SlowStore()
    blocks = service(store)
    recipient, sender = uuid.uuid4(), uuid.uuid4()
    device = Device(1, "h", "s", 1, None, None, True, {}, 0, 0)
    principal = Principal(Account(recipient, None, None, b"", None, None, False, True, 0, devices=[device]), device)
    await blocks.block(principal, str(sender))
    assert await blocks.is_blocked(recipient, sender, None)
    blocks.invalidate(recipient)  # as if the entry had expired
    store.gate.clear()
    stale = asyncio.ensure_future(blocks.is_blocked(recipient, sender, None))
    await asyncio.sleep(0.01)
    await blocks.unblock(principal, str(sender))
    store.gate.set()
    assert await stale is True  # it read the list from before the unblock ...
    assert not await blocks.is_blocked(recipient, sender, None)  # ... but did not cache it
