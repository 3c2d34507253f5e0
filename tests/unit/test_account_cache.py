from __future__ import annotations

import asyncio
import uuid
from typing import Any

from mailslot.backends.memory.account_cache import CachedAccountStore
from mailslot.stores.models import Account, Device


def account(aci: uuid.UUID) -> Account:
    device = Device(1, "2.h", "s", 1, 2, None, True, {"spqr": True}, 0, 0)
    return Account(aci, "+15555550001", uuid.uuid4(), b"\x05" + bytes(32), None, bytes(16), False, True, 0,
                   devices=[device])


class FakeStore:
    def __init__(self) -> None:
        self.accounts: dict[uuid.UUID, Account] = {}
        self.reads = 0
        self.gate: asyncio.Event | None = None

    async def get_by_aci(self, aci: uuid.UUID) -> Account | None:
        self.reads += 1
        found = self.accounts.get(aci)
        snapshot = found.copy() if found else None  # what the database held when the read began
        if self.gate is not None:
            await self.gate.wait()
        return snapshot

    async def get_many_by_aci(self, acis: list[uuid.UUID]) -> dict[uuid.UUID, Account]:
        self.reads += 1
        return {aci: self.accounts[aci].copy() for aci in acis if aci in self.accounts}

    async def update_account(self, value: Account) -> None:
        self.accounts[value.aci] = value.copy()

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_hits_within_ttl_and_reads_again_after() -> None:
    inner, clock = FakeStore(), Clock()
    aci = uuid.uuid4()
    inner.accounts[aci] = account(aci)
    cache = CachedAccountStore(inner, ttl_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    assert (await cache.get_by_aci(aci)) is not None
    assert (await cache.get_by_aci(aci)) is not None
    assert inner.reads == 1
    clock.now += 1.5
    await cache.get_by_aci(aci)
    assert inner.reads == 2


async def test_returned_accounts_are_copies() -> None:
    inner = FakeStore()
    aci = uuid.uuid4()
    inner.accounts[aci] = account(aci)
    cache = CachedAccountStore(inner, ttl_seconds=60)  # type: ignore[arg-type]
    first = await cache.get_by_aci(aci)
    assert first is not None
    first.devices[0].capabilities["storage"] = True
    first.devices.clear()
    second = await cache.get_by_aci(aci)
    assert second is not None and len(second.devices) == 1 and "storage" not in second.devices[0].capabilities


async def test_writes_through_the_cache_are_seen_at_once() -> None:
    inner = FakeStore()
    aci = uuid.uuid4()
    inner.accounts[aci] = account(aci)
    cache = CachedAccountStore(inner, ttl_seconds=60)  # type: ignore[arg-type]
    cached = await cache.get_by_aci(aci)
    assert cached is not None
    cached.discoverable_by_phone_number = False
    await cache.update_account(cached)
    again = await cache.get_by_aci(aci)
    assert again is not None and again.discoverable_by_phone_number is False


async def test_unknown_accounts_are_not_cached() -> None:
    inner = FakeStore()
    aci = uuid.uuid4()
    cache = CachedAccountStore(inner, ttl_seconds=60)  # type: ignore[arg-type]
    assert await cache.get_by_aci(aci) is None
    inner.accounts[aci] = account(aci)
    assert await cache.get_by_aci(aci) is not None


async def test_concurrent_misses_share_one_read() -> None:
    inner = FakeStore()
    aci = uuid.uuid4()
    inner.accounts[aci] = account(aci)
    inner.gate = asyncio.Event()
    cache = CachedAccountStore(inner, ttl_seconds=60)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(cache.get_by_aci(aci)) for _ in range(20)]
    await asyncio.sleep(0.01)
    inner.gate.set()
    results = await asyncio.gather(*tasks)
    assert inner.reads == 1
    assert all(r is not None for r in results) and len({id(r) for r in results}) == 20


async def test_a_read_overtaken_by_a_write_is_not_cached() -> None:
    inner = FakeStore()
    aci = uuid.uuid4()
    inner.accounts[aci] = account(aci)
    inner.gate = asyncio.Event()
    cache = CachedAccountStore(inner, ttl_seconds=60)  # type: ignore[arg-type]
    slow_read = asyncio.create_task(cache.get_by_aci(aci))
    await asyncio.sleep(0.01)
    changed = account(aci)
    changed.discoverable_by_phone_number = False
    await cache.update_account(changed)  # lands while the read is under way
    inner.gate.set()
    stale = await slow_read
    assert stale is not None and stale.discoverable_by_phone_number is True  # the read saw the old row
    inner.gate = None
    fresh = await cache.get_by_aci(aci)
    assert fresh is not None and fresh.discoverable_by_phone_number is False


async def test_many_at_once_reads_only_the_misses_in_one_batch_and_leaves_unknown_ones_out() -> None:
    inner, clock = FakeStore(), Clock()
    known = [uuid.uuid4() for _ in range(3)]
    for aci in known:
        inner.accounts[aci] = account(aci)
    cache = CachedAccountStore(inner, ttl_seconds=1.0, clock=clock)  # type: ignore[arg-type]
    await cache.get_by_aci(known[0])
    unknown = uuid.uuid4()
    found = await cache.get_many_by_aci([*known, unknown])
    assert set(found) == set(known) and inner.reads == 2  # one single read, one batch for the two misses
    found[known[1]].number = "+15555559999"
    assert (await cache.get_many_by_aci(known))[known[1]].number == "+15555550001"  # copies, from memory
    assert inner.reads == 2
    clock.now += 2
    await cache.get_many_by_aci(known)
    assert inner.reads == 3
