"""Block keys (sealed at rest) and block tokens in SQL."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mailslot.backends.sql.accounts import SqlAccountStore
from mailslot.backends.sql.database import Database
from mailslot.backends.sql.social_tables import account_block_keys, account_blocks

# Deleting or re-registering an account deletes its block list with the rest of its rows.
for _table in (account_blocks, account_block_keys):
    if (_table, "aci") not in SqlAccountStore.extra_account_tables:
        SqlAccountStore.extra_account_tables.append((_table, "aci"))


class SqlBlockStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get_key(self, aci: uuid.UUID) -> bytes | None:
        async with self.db.read() as conn:
            value = await conn.scalar(sa.select(account_block_keys.c.sealed_key).where(account_block_keys.c.aci == aci))
        return bytes(value) if value is not None else None

    async def put_key(self, aci: uuid.UUID, sealed_key: bytes) -> bytes:
        """Store the account's sealed key unless one exists; returns the one that is stored."""
        try:
            async with self.db.write() as conn:
                await conn.execute(account_block_keys.insert().values(aci=aci, sealed_key=sealed_key))
            return sealed_key
        except IntegrityError:
            existing = await self.get_key(aci)
            assert existing is not None
            return existing

    async def tokens(self, aci: uuid.UUID) -> set[bytes]:
        async with self.db.read() as conn:
            rows = await conn.execute(sa.select(account_blocks.c.token).where(account_blocks.c.aci == aci))
            return {bytes(row.token) for row in rows}

    async def add(self, aci: uuid.UUID, token: bytes) -> None:
        try:
            async with self.db.write() as conn:
                await conn.execute(account_blocks.insert().values(aci=aci, token=token))
        except IntegrityError:
            pass  # already blocked

    async def remove(self, aci: uuid.UUID, token: bytes) -> None:
        async with self.db.write() as conn:
            await conn.execute(
                account_blocks.delete().where(account_blocks.c.aci == aci, account_blocks.c.token == token)
            )
