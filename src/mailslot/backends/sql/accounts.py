"""Accounts, devices and their repeated-use keys in SQL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from mailslot.backends.sql import tables as t
from mailslot.backends.sql.database import Database
from mailslot.stores.models import Account, Device, DeviceKeys, SignedPreKey


def _device_from_row(row: Any) -> Device:
    return Device(
        device_id=row.device_id,
        auth_hash=row.auth_hash,
        auth_salt=row.auth_salt,
        registration_id=row.registration_id,
        pni_registration_id=row.pni_registration_id,
        name=row.name,
        fetches_messages=row.fetches_messages,
        capabilities=json.loads(row.capabilities),
        created_at=row.created_at,
        last_seen=row.last_seen,
        user_agent=row.user_agent,
        gcm_token=row.gcm_token,
        apn_token=row.apn_token,
        token_generation=row.token_generation,
    )


def _device_values(aci: uuid.UUID, device: Device) -> dict[str, Any]:
    return {
        "aci": aci,
        "device_id": device.device_id,
        "auth_hash": device.auth_hash,
        "auth_salt": device.auth_salt,
        "registration_id": device.registration_id,
        "pni_registration_id": device.pni_registration_id,
        "name": device.name,
        "fetches_messages": device.fetches_messages,
        "capabilities": json.dumps(device.capabilities, sort_keys=True),
        "created_at": device.created_at,
        "last_seen": device.last_seen,
        "user_agent": device.user_agent,
        "gcm_token": device.gcm_token,
        "apn_token": device.apn_token,
        "token_generation": device.token_generation,
    }


def _account_values(account: Account) -> dict[str, Any]:
    return {
        "aci": account.aci,
        "number": account.number,
        "pni": account.pni,
        "aci_identity_key": account.aci_identity_key,
        "pni_identity_key": account.pni_identity_key,
        "unidentified_access_key": account.unidentified_access_key,
        "unrestricted_unidentified_access": account.unrestricted_unidentified_access,
        "discoverable_by_phone_number": account.discoverable_by_phone_number,
        "created_at": account.created_at,
        "registration_lock_hash": account.registration_lock_hash,
        "registration_lock_salt": account.registration_lock_salt,
        "recovery_password_hash": account.recovery_password_hash,
        "recovery_password_salt": account.recovery_password_salt,
        "totp_secret": account.totp_secret,
        "totp_pending_secret": account.totp_pending_secret,
        "totp_backup_codes": json.dumps(account.totp_backup_codes),
    }


def _account_from_rows(row: Any, device_rows: list[Any]) -> Account:
    return Account(
        aci=row.aci,
        number=row.number,
        pni=row.pni,
        aci_identity_key=row.aci_identity_key,
        pni_identity_key=row.pni_identity_key,
        unidentified_access_key=row.unidentified_access_key,
        unrestricted_unidentified_access=row.unrestricted_unidentified_access,
        discoverable_by_phone_number=row.discoverable_by_phone_number,
        created_at=row.created_at,
        registration_lock_hash=row.registration_lock_hash,
        registration_lock_salt=row.registration_lock_salt,
        recovery_password_hash=row.recovery_password_hash,
        recovery_password_salt=row.recovery_password_salt,
        totp_secret=row.totp_secret,
        totp_pending_secret=row.totp_pending_secret,
        totp_backup_codes=json.loads(row.totp_backup_codes or "[]"),
        devices=[_device_from_row(d) for d in device_rows],
    )


class SqlAccountStore:
    """Implements :class:`mailslot.stores.interfaces.AccountStore`."""

    # Tables added by later schema steps register here so that account deletion and
    # re-registration reach them too: (table, name of its account column).
    extra_account_tables: list[tuple[sa.Table, str]] = []

    def __init__(self, db: Database) -> None:
        self.db = db

    async def _load(self, conn: AsyncConnection, where: sa.ColumnElement[bool]) -> Account | None:
        row = (await conn.execute(sa.select(t.accounts).where(where))).first()
        if row is None:
            return None
        device_rows = await conn.execute(
            sa.select(t.devices).where(t.devices.c.aci == row.aci).order_by(t.devices.c.device_id)
        )
        return _account_from_rows(row, list(device_rows))

    async def get_many_by_aci(self, acis: list[uuid.UUID]) -> dict[uuid.UUID, Account]:
        """Many accounts in two queries per chunk (a multi-recipient send to a large group)."""
        found: dict[uuid.UUID, Account] = {}
        async with self.db.read() as conn:
            for start in range(0, len(acis), 500):
                chunk = acis[start:start + 500]
                rows = (await conn.execute(sa.select(t.accounts).where(t.accounts.c.aci.in_(chunk)))).all()
                devices: dict[uuid.UUID, list[Any]] = {}
                for device in await conn.execute(
                    sa.select(t.devices).where(t.devices.c.aci.in_(chunk)).order_by(t.devices.c.device_id)
                ):
                    devices.setdefault(device.aci, []).append(device)
                for row in rows:
                    found[row.aci] = _account_from_rows(row, devices.get(row.aci, []))
        return found

    async def get_by_aci(self, aci: uuid.UUID) -> Account | None:
        async with self.db.read() as conn:
            return await self._load(conn, t.accounts.c.aci == aci)

    async def get_by_number(self, number: str) -> Account | None:
        async with self.db.read() as conn:
            return await self._load(conn, t.accounts.c.number == number)

    async def get_by_pni(self, pni: uuid.UUID) -> Account | None:
        async with self.db.read() as conn:
            return await self._load(conn, t.accounts.c.pni == pni)

    async def get_or_create_pni(self, number: str) -> uuid.UUID:
        """The number's PNI, allocated once. Concurrent first calls agree: the losing insert does nothing
        (``ON CONFLICT DO NOTHING``) and both read the row that won."""
        table = t.phone_number_identifiers
        async with self.db.write() as conn:
            existing = await conn.scalar(sa.select(table.c.pni).where(table.c.number == number))
            if existing is not None:
                return uuid.UUID(str(existing))
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            await conn.execute(
                insert(table).values(number=number, pni=uuid.uuid4()).on_conflict_do_nothing(
                    index_elements=[table.c.number]
                )
            )
            pni = await conn.scalar(sa.select(table.c.pni).where(table.c.number == number))
            return uuid.UUID(str(pni))

    async def _delete_account_rows(self, conn: AsyncConnection, aci: uuid.UUID, keep_account: bool) -> None:
        for table, column in self.extra_account_tables:
            await conn.execute(table.delete().where(table.c[column] == aci))
        for table in t.ACCOUNT_TABLES:
            if keep_account and table is t.accounts:
                continue
            await conn.execute(table.delete().where(table.c.aci == aci))

    async def create_or_replace(
        self, account: Account, primary: Device, keys: list[DeviceKeys], reclaimed: bool
    ) -> None:
        async with self.db.write() as conn:
            if reclaimed:
                await self._delete_account_rows(conn, account.aci, keep_account=True)
                await conn.execute(
                    t.accounts.update().where(t.accounts.c.aci == account.aci).values(**_account_values(account))
                )
            else:
                await conn.execute(t.accounts.insert().values(**_account_values(account)))
            await conn.execute(t.devices.insert().values(**_device_values(account.aci, primary)))
            await self._insert_keys(conn, account.aci, primary.device_id, keys)

    async def _insert_keys(
        self, conn: AsyncConnection, aci: uuid.UUID, device_id: int, keys: list[DeviceKeys]
    ) -> None:
        for item in keys:
            await conn.execute(
                t.signed_keys.insert().values(
                    aci=aci,
                    device_id=device_id,
                    identity=item.identity,
                    ec_key_id=item.signed_pre_key.key_id,
                    ec_public_key=item.signed_pre_key.public_key,
                    ec_signature=item.signed_pre_key.signature,
                    kem_key_id=item.last_resort_pre_key.key_id,
                    kem_public_key=item.last_resort_pre_key.public_key,
                    kem_signature=item.last_resort_pre_key.signature,
                )
            )

    async def update_account(self, account: Account) -> None:
        values = _account_values(account)
        del values["aci"]
        async with self.db.write() as conn:
            await conn.execute(t.accounts.update().where(t.accounts.c.aci == account.aci).values(**values))

    async def update_device(self, aci: uuid.UUID, device: Device) -> None:
        values = _device_values(aci, device)
        async with self.db.write() as conn:
            await conn.execute(
                t.devices.update()
                .where(t.devices.c.aci == aci, t.devices.c.device_id == device.device_id)
                .values(**values)
            )

    async def touch_device(self, aci: uuid.UUID, device_id: int, last_seen: int) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                t.devices.update()
                .where(t.devices.c.aci == aci, t.devices.c.device_id == device_id)
                .values(last_seen=last_seen)
            )

    async def freeze_credentials(self, aci: uuid.UUID) -> None:
        async with self.db.write() as conn:
            rows = await conn.execute(
                sa.select(t.devices.c.device_id, t.devices.c.auth_hash).where(t.devices.c.aci == aci)
            )
            for device_id, auth_hash in rows.all():
                if auth_hash.startswith("!"):
                    continue
                await conn.execute(
                    t.devices.update()
                    .where(t.devices.c.aci == aci, t.devices.c.device_id == device_id)
                    .values(auth_hash="!" + auth_hash)
                )
            await conn.execute(t.refresh_tokens.delete().where(t.refresh_tokens.c.aci == aci))

    async def delete_account(self, aci: uuid.UUID) -> None:
        async with self.db.write() as conn:
            await self._delete_account_rows(conn, aci, keep_account=False)

    async def add_device(self, aci: uuid.UUID, device: Device, keys: list[DeviceKeys], max_devices: int) -> int | None:
        """Add a linked device with the lowest free id ≥ 2, atomically; None when the account is full."""
        for _ in range(5):
            async with self.db.write() as conn:
                taken = {
                    int(row[0])
                    for row in await conn.execute(sa.select(t.devices.c.device_id).where(t.devices.c.aci == aci))
                }
                if len(taken) >= max_devices:
                    return None
                device.device_id = next(i for i in range(2, 128) if i not in taken)
                try:
                    async with conn.begin_nested():
                        await conn.execute(t.devices.insert().values(**_device_values(aci, device)))
                except sa.exc.IntegrityError:
                    continue  # another link took that id at the same moment: count again
                await self._insert_keys(conn, aci, device.device_id, keys)
                return device.device_id
        raise RuntimeError("could not allocate a device id")

    async def remove_device(self, aci: uuid.UUID, device_id: int) -> bool:
        """Delete a device and everything that belongs to it (keys, queue, tokens) in one transaction."""
        async with self.db.write() as conn:
            removed = 0
            for table in t.DEVICE_TABLES:
                result = await conn.execute(
                    table.delete().where(table.c.aci == aci, table.c.device_id == device_id)
                )
                if table is t.devices:
                    removed = int(result.rowcount or 0)
            return removed > 0

    async def use_link_token(self, token_hash: str, expires_at: int) -> bool:
        """Record a link token as used; False if it was used before."""
        async with self.db.write() as conn:
            try:
                async with conn.begin_nested():
                    await conn.execute(t.used_link_tokens.insert().values(token_hash=token_hash, expires_at=expires_at))
            except sa.exc.IntegrityError:
                return False
            return True

    async def delete_expired_link_tokens(self, now: int) -> int:
        async with self.db.write() as conn:
            result = await conn.execute(t.used_link_tokens.delete().where(t.used_link_tokens.c.expires_at < now))
            return int(result.rowcount or 0)

    # The directory of sharded storage (see ``tables.account_directory``); unused with one database.

    async def put_directory(self, entries: dict[str, uuid.UUID]) -> None:
        """Point each lookup key at its account (insert or overwrite)."""
        if not entries:
            return
        table = t.account_directory
        async with self.db.write() as conn:
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
            statement = insert(table)
            upsert = statement.on_conflict_do_update(
                index_elements=[table.c.lookup_key], set_={"aci": statement.excluded.aci}
            )
            await conn.execute(
                upsert,
                [{"lookup_key": key, "aci": aci} for key, aci in entries.items()],
            )

    async def lookup_directory(self, key: str) -> uuid.UUID | None:
        table = t.account_directory
        async with self.db.read() as conn:
            value = await conn.scalar(sa.select(table.c.aci).where(table.c.lookup_key == key))
        return uuid.UUID(str(value)) if value is not None else None

    async def delete_directory(self, keys: list[str], aci: uuid.UUID) -> None:
        """Remove the keys that still point at ``aci`` (a key re-pointed at another account stays)."""
        table = t.account_directory
        async with self.db.write() as conn:
            await conn.execute(table.delete().where(table.c.lookup_key.in_(keys), table.c.aci == aci))

    async def get_device_keys(self, aci: uuid.UUID, device_id: int) -> list[DeviceKeys]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(t.signed_keys)
                .where(t.signed_keys.c.aci == aci, t.signed_keys.c.device_id == device_id)
                .order_by(t.signed_keys.c.identity)
            )
            return [
                DeviceKeys(
                    identity=r.identity,
                    signed_pre_key=SignedPreKey(r.ec_key_id, r.ec_public_key, r.ec_signature),
                    last_resort_pre_key=SignedPreKey(r.kem_key_id, r.kem_public_key, r.kem_signature),
                )
                for r in rows
            ]

    async def count_rows_for(self, aci: uuid.UUID) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self.db.read() as conn:
            for table, column in [(tb, "aci") for tb in t.ACCOUNT_TABLES] + list(self.extra_account_tables):
                counts[table.name] = int(
                    await conn.scalar(
                        sa.select(sa.func.count()).select_from(table).where(table.c[column] == aci)
                    )
                    or 0
                )
        return counts
