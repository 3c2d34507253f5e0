"""The stores over several databases: each call goes to the shard that holds its key.

Everything keyed by an account (the account, devices, keys, one-time keys, queued messages, refresh
tokens, block lists) lives on the shard of its ACI. Lookups by another key live on the shard of that key
(see :mod:`mailslot.backends.sharding.ring`): the number/PNI directory and PNI allocations, verification
sessions, used link tokens and groups.

Writes that touch several shards are not one distributed transaction; they are ordered so that a crash
in between leaves nothing wrong that the reads do not already tolerate: directory rows are written before
the account (a directory row without its account, or one whose account has another number now, is
ignored), and message inserts are idempotent on their GUID, so a batch is retried on the shards that
failed and the sender gets 200 only after every shard has committed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from mailslot.backends.sharding.ring import (
    HashRing,
    group_key,
    link_token_key,
    number_key,
    pni_key,
    session_key,
    shard_label,
)
from mailslot.backends.sql.accounts import SqlAccountStore
from mailslot.backends.sql.blocks import SqlBlockStore
from mailslot.backends.sql.database import Database
from mailslot.backends.sql.groups import SqlGroupStore
from mailslot.backends.sql.keys import SqlKeyStore
from mailslot.backends.sql.messages import SqlMessageStore
from mailslot.backends.sql.migrations import migrate
from mailslot.backends.sql.profiles import SqlProfileStore
from mailslot.backends.sql.sessions import SqlRefreshTokenStore, SqlVerificationSessionStore
from mailslot.config import StorageSettings
from mailslot.storage_setup import Storage
from mailslot.stores.groups import GroupChangeRecord
from mailslot.stores.models import (
    Account,
    Device,
    DeviceBundle,
    DeviceKeys,
    NewMessage,
    PreKey,
    RefreshToken,
    SharedPayload,
    SignedPreKey,
    StoredMessage,
    VerificationSession,
)
from mailslot.stores.profiles import CurrentProfile, VersionedProfile

log = logging.getLogger("mailslot.sharding")

# A batch of message writes is retried this many times on the shards where it failed.
APPLY_ATTEMPTS = 3


def shard_settings(settings: StorageSettings, url: str) -> StorageSettings:
    """The settings of one shard: its URL; pool size and schema as configured for all shards."""
    return settings.model_copy(update={"url": url, "urls": []})


def _directory_keys(account: Account) -> list[str]:
    keys: list[str] = []
    if account.number:
        keys.append(number_key(account.number))
    if account.pni:
        keys.append(pni_key(account.pni))
    return keys


class ShardedAccountStore:
    """Implements :class:`mailslot.stores.interfaces.AccountStore` over one SQL store per shard."""

    def __init__(self, ring: HashRing, shards: Sequence[SqlAccountStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, key: str | bytes | uuid.UUID) -> SqlAccountStore:
        return self.shards[self.ring.shard_for(key)]

    async def get_by_aci(self, aci: uuid.UUID) -> Account | None:
        return await self._for(aci).get_by_aci(aci)

    async def get_many_by_aci(self, acis: list[uuid.UUID]) -> dict[uuid.UUID, Account]:
        groups: dict[int, list[uuid.UUID]] = {}
        for aci in acis:
            groups.setdefault(self.ring.shard_for(aci), []).append(aci)
        found: dict[uuid.UUID, Account] = {}
        results = await asyncio.gather(*(self.shards[s].get_many_by_aci(ids) for s, ids in groups.items()))
        for result in results:
            found.update(result)
        return found

    async def get_by_number(self, number: str) -> Account | None:
        key = number_key(number)
        aci = await self._for(key).lookup_directory(key)
        if aci is None:
            return None
        account = await self.get_by_aci(aci)
        return account if account is not None and account.number == number else None

    async def get_by_pni(self, pni: uuid.UUID) -> Account | None:
        key = pni_key(pni)
        aci = await self._for(key).lookup_directory(key)
        if aci is None:
            return None
        account = await self.get_by_aci(aci)
        return account if account is not None and account.pni == pni else None

    async def get_or_create_pni(self, number: str) -> uuid.UUID:
        return await self._for(number_key(number)).get_or_create_pni(number)

    async def _put_directory(self, account: Account) -> None:
        by_shard: dict[int, dict[str, uuid.UUID]] = {}
        for key in _directory_keys(account):
            by_shard.setdefault(self.ring.shard_for(key), {})[key] = account.aci
        await asyncio.gather(*(self.shards[s].put_directory(entries) for s, entries in by_shard.items()))

    async def _drop_directory(self, keys: list[str], aci: uuid.UUID) -> None:
        by_shard: dict[int, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self.ring.shard_for(key), []).append(key)
        await asyncio.gather(*(self.shards[s].delete_directory(ks, aci) for s, ks in by_shard.items()))

    async def create_or_replace(
        self, account: Account, primary: Device, keys: list[DeviceKeys], reclaimed: bool
    ) -> None:
        """Directory rows first, then the account in one transaction on its shard."""
        home = self._for(account.aci)
        previous = await home.get_by_aci(account.aci) if reclaimed else None
        await self._put_directory(account)
        await home.create_or_replace(account, primary, keys, reclaimed)
        if previous is not None:
            stale = set(_directory_keys(previous)) - set(_directory_keys(account))
            if stale:
                await self._drop_directory(sorted(stale), account.aci)

    async def update_account(self, account: Account) -> None:
        # The number or PNI may have changed: point the directory at the account first.
        await self._put_directory(account)
        await self._for(account.aci).update_account(account)

    async def update_device(self, aci: uuid.UUID, device: Device) -> None:
        await self._for(aci).update_device(aci, device)

    async def touch_device(self, aci: uuid.UUID, device_id: int, last_seen: int) -> None:
        await self._for(aci).touch_device(aci, device_id, last_seen)

    async def freeze_credentials(self, aci: uuid.UUID) -> None:
        await self._for(aci).freeze_credentials(aci)

    async def delete_account(self, aci: uuid.UUID) -> None:
        home = self._for(aci)
        account = await home.get_by_aci(aci)
        await home.delete_account(aci)
        if account is not None:
            await self._drop_directory(_directory_keys(account), aci)

    async def add_device(self, aci: uuid.UUID, device: Device, keys: list[DeviceKeys], max_devices: int) -> int | None:
        return await self._for(aci).add_device(aci, device, keys, max_devices)

    async def remove_device(self, aci: uuid.UUID, device_id: int) -> bool:
        return await self._for(aci).remove_device(aci, device_id)

    async def use_link_token(self, token_hash: str, expires_at: int) -> bool:
        return await self._for(link_token_key(token_hash)).use_link_token(token_hash, expires_at)

    async def delete_expired_link_tokens(self, now: int) -> int:
        return sum(await asyncio.gather(*(s.delete_expired_link_tokens(now) for s in self.shards)))

    async def get_device_keys(self, aci: uuid.UUID, device_id: int) -> list[DeviceKeys]:
        return await self._for(aci).get_device_keys(aci, device_id)

    async def count_rows_for(self, aci: uuid.UUID) -> dict[str, int]:
        return await self._for(aci).count_rows_for(aci)


class ShardedVerificationSessionStore:
    def __init__(self, ring: HashRing, shards: Sequence[SqlVerificationSessionStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, session_id: str) -> SqlVerificationSessionStore:
        return self.shards[self.ring.shard_for(session_key(session_id))]

    async def insert(self, session: VerificationSession) -> None:
        await self._for(session.id).insert(session)

    async def get(self, session_id: str) -> VerificationSession | None:
        return await self._for(session_id).get(session_id)

    async def update(self, session: VerificationSession) -> None:
        await self._for(session.id).update(session)

    async def compare_and_set(self, session_id: str, expected: dict[str, Any], values: dict[str, Any]) -> bool:
        return await self._for(session_id).compare_and_set(session_id, expected, values)

    async def delete_expired(self, now: int) -> int:
        return sum(await asyncio.gather(*(s.delete_expired(now) for s in self.shards)))


class ShardedRefreshTokenStore:
    """Refresh tokens on their account's shard (the refresh JWT names the account)."""

    def __init__(self, ring: HashRing, shards: Sequence[SqlRefreshTokenStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    async def insert(self, token: RefreshToken) -> None:
        await self.shards[self.ring.shard_for(token.aci)].insert(token)

    async def mark_used(self, aci: uuid.UUID, token_id: str) -> RefreshToken | None:
        return await self.shards[self.ring.shard_for(aci)].mark_used(aci, token_id)

    async def revoke_family(self, aci: uuid.UUID, family_id: str) -> None:
        await self.shards[self.ring.shard_for(aci)].revoke_family(aci, family_id)

    async def delete_expired(self, now: int) -> int:
        return sum(await asyncio.gather(*(s.delete_expired(now) for s in self.shards)))


class ShardedKeyStore:
    def __init__(self, ring: HashRing, shards: Sequence[SqlKeyStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, aci: uuid.UUID) -> SqlKeyStore:
        return self.shards[self.ring.shard_for(aci)]

    async def store_keys(
        self,
        aci: uuid.UUID,
        identity: str,
        device_id: int,
        ec_keys: list[PreKey] | None,
        kem_keys: list[SignedPreKey] | None,
        signed_pre_key: SignedPreKey | None,
        last_resort_pre_key: SignedPreKey | None,
    ) -> None:
        await self._for(aci).store_keys(
            aci, identity, device_id, ec_keys, kem_keys, signed_pre_key, last_resort_pre_key
        )

    async def counts(self, aci: uuid.UUID, identity: str, device_id: int) -> tuple[int, int]:
        return await self._for(aci).counts(aci, identity, device_id)

    async def get_signed_keys(
        self, aci: uuid.UUID, identity: str, device_id: int
    ) -> tuple[SignedPreKey, SignedPreKey] | None:
        return await self._for(aci).get_signed_keys(aci, identity, device_id)

    async def take_bundle(self, aci: uuid.UUID, identity: str, device_ids: list[int]) -> list[DeviceBundle]:
        return await self._for(aci).take_bundle(aci, identity, device_ids)


class _ShardBatch:
    __slots__ = ("deletes", "messages", "positions", "shared")

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.messages: list[NewMessage] = []
        self.shared: list[SharedPayload] = []
        self.deletes: list[tuple[uuid.UUID, int, int]] = []


class ShardedMessageStore:
    """Queues on their account's shard. Message ids are per shard, always used with the account id."""

    def __init__(self, ring: HashRing, shards: Sequence[SqlMessageStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, aci: uuid.UUID) -> SqlMessageStore:
        return self.shards[self.ring.shard_for(aci)]

    def split(
        self, messages: list[NewMessage], shared: list[SharedPayload], deletes: list[tuple[uuid.UUID, int, int]]
    ) -> dict[int, _ShardBatch]:
        """Rows by shard; a shared payload goes to each shard holding a row that references it."""
        batches: dict[int, _ShardBatch] = {}
        for position, message in enumerate(messages):
            batch = batches.setdefault(self.ring.shard_for(message.aci), _ShardBatch())
            batch.positions.append(position)
            batch.messages.append(message)
        for delete in deletes:
            batches.setdefault(self.ring.shard_for(delete[0]), _ShardBatch()).deletes.append(delete)
        for batch in batches.values():
            wanted = {m.shared_id for m in batch.messages if m.shared_id is not None}
            batch.shared = [payload for payload in shared if payload.id in wanted]
        return batches

    async def apply(
        self, messages: list[NewMessage], shared: list[SharedPayload], deletes: list[tuple[uuid.UUID, int, int]]
    ) -> list[int]:
        """One transaction per shard, committed concurrently; returns once all have committed.

        A shard that fails is retried (inserts are idempotent on GUID, deletes by id); if it still fails
        the whole call raises, and the sender does not get 200 — rows committed on other shards stay and
        a retry of the same batch finds them."""
        batches = self.split(messages, shared, deletes)
        ids = [0] * len(messages)
        pending = dict(batches)
        error: BaseException | None = None
        for attempt in range(APPLY_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * attempt)
            order = list(pending)
            results = await asyncio.gather(
                *(self.shards[s].apply(pending[s].messages, pending[s].shared, pending[s].deletes) for s in order),
                return_exceptions=True,
            )
            failed: dict[int, _ShardBatch] = {}
            for shard, result in zip(order, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("message batch failed on %s: %r", shard_label(shard), result)
                    error = result
                    failed[shard] = pending[shard]
                    continue
                for position, message_id in zip(pending[shard].positions, result, strict=True):
                    ids[position] = message_id
            if not failed:
                return ids
            pending = failed
        assert error is not None
        raise error

    async def fetch(
        self, aci: uuid.UUID, device_id: int, exclude: set[int], limit: int, now: int
    ) -> list[StoredMessage]:
        return await self._for(aci).fetch(aci, device_id, exclude, limit, now)

    async def delete(self, aci: uuid.UUID, device_id: int, ids: list[int]) -> int:
        return await self._for(aci).delete(aci, device_id, ids)

    async def take_by_guid(self, aci: uuid.UUID, device_id: int, guid: uuid.UUID) -> StoredMessage | None:
        return await self._for(aci).take_by_guid(aci, device_id, guid)

    async def delete_device(self, aci: uuid.UUID, device_id: int | None) -> None:
        await self._for(aci).delete_device(aci, device_id)

    async def count(self, aci: uuid.UUID, device_id: int) -> int:
        return await self._for(aci).count(aci, device_id)

    async def delete_expired(self, now: int) -> int:
        return sum(await asyncio.gather(*(s.delete_expired(now) for s in self.shards)))


class ShardedGroupStore:
    """Each group (its state and change log) on the shard of its id."""

    def __init__(self, ring: HashRing, shards: Sequence[SqlGroupStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, group_id: bytes) -> SqlGroupStore:
        return self.shards[self.ring.shard_for(group_key(group_id))]

    async def create(self, group_id: bytes, state: str, change: GroupChangeRecord, avatar: str = "") -> bool:
        return await self._for(group_id).create(group_id, state, change, avatar)

    async def get(self, group_id: bytes) -> tuple[int, str] | None:
        return await self._for(group_id).get(group_id)

    async def update(self, group_id: bytes, expected_revision: int, state: str, change: GroupChangeRecord,
                     avatar: str = "") -> bool:
        return await self._for(group_id).update(group_id, expected_revision, state, change, avatar)

    async def avatars_in_use(self, keys: list[str]) -> set[str]:
        found = await asyncio.gather(*(shard.avatars_in_use(keys) for shard in self.shards))
        return set().union(*found)

    async def changes(self, group_id: bytes, from_revision: int, limit: int) -> list[GroupChangeRecord]:
        return await self._for(group_id).changes(group_id, from_revision, limit)


class ShardedProfileStore:
    """Profiles (every version and the current one) on the account's shard."""

    def __init__(self, ring: HashRing, shards: Sequence[SqlProfileStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, aci: uuid.UUID) -> SqlProfileStore:
        return self.shards[self.ring.shard_for(aci)]

    async def get(self, aci: uuid.UUID, version: str) -> VersionedProfile | None:
        return await self._for(aci).get(aci, version)

    async def current(self, aci: uuid.UUID) -> CurrentProfile | None:
        return await self._for(aci).current(aci)

    async def save(self, aci: uuid.UUID, profile: VersionedProfile, badge_ids: list[str]) -> None:
        await self._for(aci).save(aci, profile, badge_ids)

    async def avatars_in_use(self, keys: list[str]) -> set[str]:
        found = await asyncio.gather(*(shard.avatars_in_use(keys) for shard in self.shards))
        return set().union(*found)


class ShardedBlockStore:
    """Block keys and tokens on the blocking account's shard."""

    def __init__(self, ring: HashRing, shards: Sequence[SqlBlockStore]) -> None:
        self.ring = ring
        self.shards = list(shards)

    def _for(self, aci: uuid.UUID) -> SqlBlockStore:
        return self.shards[self.ring.shard_for(aci)]

    async def get_key(self, aci: uuid.UUID) -> bytes | None:
        return await self._for(aci).get_key(aci)

    async def put_key(self, aci: uuid.UUID, sealed_key: bytes) -> bytes:
        return await self._for(aci).put_key(aci, sealed_key)

    async def tokens(self, aci: uuid.UUID) -> set[bytes]:
        return await self._for(aci).tokens(aci)

    async def add(self, aci: uuid.UUID, token: bytes) -> None:
        await self._for(aci).add(aci, token)

    async def remove(self, aci: uuid.UUID, token: bytes) -> None:
        await self._for(aci).remove(aci, token)


async def open_shard_databases(settings: StorageSettings, run_migrations: bool) -> list[Database]:
    """One :class:`Database` per URL of ``settings.urls``, migrated when asked (all closed on failure)."""
    dbs: list[Database] = []
    try:
        for url in settings.urls:
            dbs.append(Database.from_settings(shard_settings(settings, url)))
        if run_migrations:
            await asyncio.gather(*(migrate(db.engine) for db in dbs))
    except BaseException:
        await asyncio.gather(*(db.close() for db in dbs), return_exceptions=True)
        raise
    return dbs


async def open_sharded(settings: StorageSettings, run_migrations: bool) -> Storage:
    """The stores over ``settings.urls``: shard ``i`` is the ``i``-th URL."""
    dbs = await open_shard_databases(settings, run_migrations)
    ring = HashRing(len(dbs))
    accounts = ShardedAccountStore(ring, [SqlAccountStore(db) for db in dbs])
    sessions = ShardedVerificationSessionStore(ring, [SqlVerificationSessionStore(db) for db in dbs])
    refresh = ShardedRefreshTokenStore(ring, [SqlRefreshTokenStore(db) for db in dbs])
    messages = ShardedMessageStore(ring, [SqlMessageStore(db) for db in dbs])
    storage = Storage(
        accounts=accounts,
        sessions=sessions,
        refresh_tokens=refresh,
        keys=ShardedKeyStore(ring, [SqlKeyStore(db) for db in dbs]),
        messages=messages,
        groups=ShardedGroupStore(ring, [SqlGroupStore(db) for db in dbs]),
        blocks=ShardedBlockStore(ring, [SqlBlockStore(db) for db in dbs]),
        profiles=ShardedProfileStore(ring, [SqlProfileStore(db) for db in dbs]),
        purges={
            "verification_sessions": sessions.delete_expired,
            "refresh_tokens": refresh.delete_expired,
            "messages": messages.delete_expired,
            "used_link_tokens": accounts.delete_expired_link_tokens,
        },
        pings={f"storage:{shard_label(i)}": db.ping for i, db in enumerate(dbs)},
        closers=[db.close for db in dbs],
    )
    return storage
