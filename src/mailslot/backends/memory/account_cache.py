"""A short-lived in-process cache in front of an account store.

Every message send and every tunnelled request reads accounts; the cache turns those reads into a
dict lookup. Writes through this process invalidate at once; writes by other nodes (cluster mode) are
seen after at most ``ttl_seconds``. Callers get copies, so mutating a returned account never changes
the cached one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from mailslot.stores.interfaces import AccountStore
from mailslot.stores.models import Account, Device, DeviceKeys


class CachedAccountStore:
    def __init__(
        self, inner: AccountStore, ttl_seconds: float = 1.0, max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.ttl = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._by_aci: dict[uuid.UUID, tuple[float, Account | None]] = {}
        # One read per account at a time: concurrent misses wait for the read already under way.
        self._loading: dict[uuid.UUID, asyncio.Future[Account | None]] = {}
        self._generation = 0
        # Called with the account id after each write through this cache (cluster mode tells other nodes).
        self.write_listeners: list[Callable[[uuid.UUID], None]] = []

    def __getattr__(self, name: str) -> Any:
        # Anything beyond the interface (e.g. the database handle tests use) comes from the inner store.
        return getattr(self.inner, name)

    def invalidate(self, aci: uuid.UUID) -> None:
        self._by_aci.pop(aci, None)
        self._loading.pop(aci, None)  # a read that started before this write must not be cached
        self._generation += 1

    def _written(self, aci: uuid.UUID) -> None:
        self.invalidate(aci)
        for listener in self.write_listeners:
            listener(aci)

    async def get_by_aci(self, aci: uuid.UUID) -> Account | None:
        if self.ttl <= 0:
            return await self.inner.get_by_aci(aci)
        hit = self._by_aci.get(aci)
        if hit is not None and hit[0] > self._clock():
            return hit[1].copy() if hit[1] is not None else None
        loading = self._loading.get(aci)
        if loading is not None:
            account = await asyncio.shield(loading)
            return account.copy() if account is not None else None
        future: asyncio.Future[Account | None] = asyncio.get_running_loop().create_future()
        self._loading[aci] = future
        generation = self._generation
        try:
            account = await self.inner.get_by_aci(aci)
        except BaseException as exc:
            if self._loading.get(aci) is future:
                del self._loading[aci]
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        if self._loading.get(aci) is future:
            del self._loading[aci]
        future.set_result(account)
        # Unknown accounts are not cached (a registration elsewhere must be visible at once), nor is
        # a read that a write in this process overtook.
        if account is not None and generation == self._generation:
            if len(self._by_aci) >= self.max_entries:
                self._by_aci.clear()
            self._by_aci[aci] = (self._clock() + self.ttl, account.copy())
        return account

    async def get_many_by_aci(self, acis: list[uuid.UUID]) -> dict[uuid.UUID, Account]:
        """Cached ones from memory, the rest in one batch from the store (then cached)."""
        now = self._clock()
        found: dict[uuid.UUID, Account] = {}
        missing: list[uuid.UUID] = []
        for aci in acis:
            hit = self._by_aci.get(aci) if self.ttl > 0 else None
            if hit is not None and hit[0] > now:
                if hit[1] is not None:
                    found[aci] = hit[1].copy()
            else:
                missing.append(aci)
        if missing:
            generation = self._generation
            loaded = await self.inner.get_many_by_aci(missing)
            cache = self.ttl > 0 and generation == self._generation
            if cache and len(self._by_aci) + len(loaded) >= self.max_entries:
                self._by_aci.clear()
            for aci, account in loaded.items():
                found[aci] = account
                if cache:
                    self._by_aci[aci] = (self._clock() + self.ttl, account.copy())
        return found

    async def get_by_number(self, number: str) -> Account | None:
        return await self.inner.get_by_number(number)

    async def get_by_pni(self, pni: uuid.UUID) -> Account | None:
        return await self.inner.get_by_pni(pni)

    async def get_or_create_pni(self, number: str) -> uuid.UUID:
        return await self.inner.get_or_create_pni(number)

    async def create_or_replace(
        self, account: Account, primary: Device, keys: list[DeviceKeys], reclaimed: bool
    ) -> None:
        self.invalidate(account.aci)
        try:
            await self.inner.create_or_replace(account, primary, keys, reclaimed)
        finally:
            self._written(account.aci)

    async def update_account(self, account: Account) -> None:
        try:
            await self.inner.update_account(account)
        finally:
            self._written(account.aci)

    async def update_device(self, aci: uuid.UUID, device: Device) -> None:
        try:
            await self.inner.update_device(aci, device)
        finally:
            self._written(aci)

    async def touch_device(self, aci: uuid.UUID, device_id: int, last_seen: int) -> None:
        try:
            await self.inner.touch_device(aci, device_id, last_seen)
        finally:
            self._written(aci)

    async def freeze_credentials(self, aci: uuid.UUID) -> None:
        try:
            await self.inner.freeze_credentials(aci)
        finally:
            self._written(aci)

    async def delete_account(self, aci: uuid.UUID) -> None:
        try:
            await self.inner.delete_account(aci)
        finally:
            self._written(aci)

    async def add_device(self, aci: uuid.UUID, device: Device, keys: list[DeviceKeys], max_devices: int) -> int | None:
        try:
            return await self.inner.add_device(aci, device, keys, max_devices)
        finally:
            self._written(aci)

    async def remove_device(self, aci: uuid.UUID, device_id: int) -> bool:
        try:
            return await self.inner.remove_device(aci, device_id)
        finally:
            self._written(aci)

    async def use_link_token(self, token_hash: str, expires_at: int) -> bool:
        return await self.inner.use_link_token(token_hash, expires_at)

    async def get_device_keys(self, aci: uuid.UUID, device_id: int) -> list[DeviceKeys]:
        return await self.inner.get_device_keys(aci, device_id)

    async def count_rows_for(self, aci: uuid.UUID) -> dict[str, int]:
        return await self.inner.count_rows_for(aci)
