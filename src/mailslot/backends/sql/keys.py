"""Pre-keys in SQL, with one-time keys handed out at most once under concurrency.

PostgreSQL: the candidate row is locked ``FOR UPDATE SKIP LOCKED`` and deleted in the same
transaction, so concurrent fetches each take a different key. SQLite: write transactions start with
``BEGIN IMMEDIATE`` (see :class:`Database`), which serialises the select-then-delete.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from mailslot.backends.sql import tables as t
from mailslot.backends.sql.database import Database
from mailslot.stores.models import DeviceBundle, PreKey, SignedPreKey


class SqlKeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

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
        owner = {"aci": aci, "identity": identity, "device_id": device_id}
        async with self.db.write() as conn:
            if ec_keys:
                table = t.one_time_ec_keys
                await conn.execute(table.delete().where(*_owned(table, aci, identity, device_id)))
                await conn.execute(
                    table.insert(), [{**owner, "key_id": k.key_id, "public_key": k.public_key} for k in ec_keys]
                )
            if kem_keys:
                table = t.one_time_kem_keys
                await conn.execute(table.delete().where(*_owned(table, aci, identity, device_id)))
                await conn.execute(
                    table.insert(),
                    [{**owner, "key_id": k.key_id, "public_key": k.public_key, "signature": k.signature}
                     for k in kem_keys],
                )
            values: dict[str, object] = {}
            if signed_pre_key is not None:
                values.update(ec_key_id=signed_pre_key.key_id, ec_public_key=signed_pre_key.public_key,
                              ec_signature=signed_pre_key.signature)
            if last_resort_pre_key is not None:
                values.update(kem_key_id=last_resort_pre_key.key_id, kem_public_key=last_resort_pre_key.public_key,
                              kem_signature=last_resort_pre_key.signature)
            if values:
                table = t.signed_keys
                result = await conn.execute(
                    table.update().where(*_owned(table, aci, identity, device_id)).values(**values)
                )
                if result.rowcount == 0 and signed_pre_key is not None and last_resort_pre_key is not None:
                    await conn.execute(table.insert().values(**owner, **values))

    async def counts(self, aci: uuid.UUID, identity: str, device_id: int) -> tuple[int, int]:
        async with self.db.read() as conn:
            ec = await conn.scalar(
                sa.select(sa.func.count()).select_from(t.one_time_ec_keys)
                .where(*_owned(t.one_time_ec_keys, aci, identity, device_id))
            )
            kem = await conn.scalar(
                sa.select(sa.func.count()).select_from(t.one_time_kem_keys)
                .where(*_owned(t.one_time_kem_keys, aci, identity, device_id))
            )
        return int(ec or 0), int(kem or 0)

    async def get_signed_keys(
        self, aci: uuid.UUID, identity: str, device_id: int
    ) -> tuple[SignedPreKey, SignedPreKey] | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(sa.select(t.signed_keys).where(*_owned(t.signed_keys, aci, identity, device_id)))
            ).first()
        if row is None:
            return None
        return (SignedPreKey(row.ec_key_id, row.ec_public_key, row.ec_signature),
                SignedPreKey(row.kem_key_id, row.kem_public_key, row.kem_signature))

    async def take_bundle(self, aci: uuid.UUID, identity: str, device_ids: list[int]) -> list[DeviceBundle]:
        bundles: list[DeviceBundle] = []
        async with self.db.write() as conn:
            rows = await conn.execute(
                sa.select(t.signed_keys).where(
                    t.signed_keys.c.aci == aci,
                    t.signed_keys.c.identity == identity,
                    t.signed_keys.c.device_id.in_(device_ids),
                ).order_by(t.signed_keys.c.device_id)
            )
            for row in rows.all():
                ec = await self._take(conn, t.one_time_ec_keys, aci, identity, row.device_id)
                kem = await self._take(conn, t.one_time_kem_keys, aci, identity, row.device_id)
                bundles.append(
                    DeviceBundle(
                        device_id=row.device_id,
                        signed_pre_key=SignedPreKey(row.ec_key_id, row.ec_public_key, row.ec_signature),
                        pre_key=PreKey(ec.key_id, ec.public_key) if ec is not None else None,
                        pq_pre_key=(
                            SignedPreKey(kem.key_id, kem.public_key, kem.signature)
                            if kem is not None
                            else SignedPreKey(row.kem_key_id, row.kem_public_key, row.kem_signature)
                        ),
                    )
                )
        return bundles

    async def _take(
        self, conn: AsyncConnection, table: sa.Table, aci: uuid.UUID, identity: str, device_id: int
    ) -> sa.Row[tuple[object, ...]] | None:
        query = sa.select(table).where(*_owned(table, aci, identity, device_id)).order_by(table.c.key_id).limit(1)
        if self.db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row = (await conn.execute(query)).first()
        if row is None:
            return None
        await conn.execute(table.delete().where(*_owned(table, aci, identity, device_id), table.c.key_id == row.key_id))
        return row


def _owned(table: sa.Table, aci: uuid.UUID, identity: str, device_id: int) -> list[sa.ColumnElement[bool]]:
    return [table.c.aci == aci, table.c.identity == identity, table.c.device_id == device_id]
