"""Verification sessions and refresh tokens in SQL."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa

from mailslot.backends.sql import tables as t
from mailslot.backends.sql.database import Database
from mailslot.stores.models import RefreshToken, VerificationSession


def _session_from_row(row: Any) -> VerificationSession:
    return VerificationSession(**{c.name: getattr(row, c.name) for c in t.verification_sessions.columns})


class SqlVerificationSessionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, session: VerificationSession) -> None:
        async with self.db.write() as conn:
            await conn.execute(t.verification_sessions.insert().values(**asdict(session)))

    async def get(self, session_id: str) -> VerificationSession | None:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(t.verification_sessions).where(t.verification_sessions.c.id == session_id)
                )
            ).first()
        return _session_from_row(row) if row is not None else None

    async def update(self, session: VerificationSession) -> None:
        values = asdict(session)
        del values["id"]
        async with self.db.write() as conn:
            await conn.execute(
                t.verification_sessions.update()
                .where(t.verification_sessions.c.id == session.id)
                .values(**values)
            )

    async def compare_and_set(self, session_id: str, expected: dict[str, Any], values: dict[str, Any]) -> bool:
        """One conditional UPDATE: the atomic step behind code requests and attempts (see the service)."""
        table = t.verification_sessions
        conditions = [table.c.id == session_id]
        for name, value in expected.items():
            column = table.c[name]
            conditions.append(column.is_(None) if value is None else column == value)
        async with self.db.write() as conn:
            result = await conn.execute(table.update().where(*conditions).values(**values))
            return int(result.rowcount or 0) == 1

    async def delete_expired(self, now: int) -> int:
        async with self.db.write() as conn:
            result = await conn.execute(
                t.verification_sessions.delete().where(t.verification_sessions.c.expires_at < now)
            )
            return int(result.rowcount or 0)


class SqlRefreshTokenStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def insert(self, token: RefreshToken) -> None:
        async with self.db.write() as conn:
            await conn.execute(t.refresh_tokens.insert().values(**asdict(token)))

    async def mark_used(self, aci: uuid.UUID, token_id: str) -> RefreshToken | None:
        table = t.refresh_tokens
        mine = (table.c.token_id == token_id, table.c.aci == aci)
        async with self.db.write() as conn:
            # The conditional update is the atomic step: of two concurrent uses only one sees rowcount 1.
            claimed = await conn.execute(table.update().where(*mine, table.c.used.is_(False)).values(used=True))
            row = (await conn.execute(sa.select(table).where(*mine))).first()
            if row is None:
                return None
            return RefreshToken(
                token_id=row.token_id,
                family_id=row.family_id,
                aci=row.aci,
                device_id=row.device_id,
                expires_at=row.expires_at,
                used=claimed.rowcount != 1,
            )

    async def revoke_family(self, aci: uuid.UUID, family_id: str) -> None:
        table = t.refresh_tokens
        async with self.db.write() as conn:
            await conn.execute(table.delete().where(table.c.family_id == family_id, table.c.aci == aci))

    async def delete_expired(self, now: int) -> int:
        """Drop refresh tokens past their expiry (spent or not)."""
        async with self.db.write() as conn:
            result = await conn.execute(t.refresh_tokens.delete().where(t.refresh_tokens.c.expires_at < now))
            return int(result.rowcount or 0)
