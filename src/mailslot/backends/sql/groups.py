"""Group states and change logs in SQL; a change is one transaction guarded by the revision."""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from mailslot.backends.sql.database import Database
from mailslot.backends.sql.social_tables import group_changes, groups
from mailslot.stores.groups import GroupChangeRecord


def _change_values(group_id: bytes, change: GroupChangeRecord) -> dict[str, object]:
    return {
        "group_id": group_id, "revision": change.revision, "actor": change.actor,
        "timestamp_ms": change.timestamp_ms, "signature": change.signature, "method": change.method,
        "path": change.path, "body": change.body,
    }


class SqlGroupStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, group_id: bytes, state: str, change: GroupChangeRecord, avatar: str = "") -> bool:
        try:
            async with self.db.write() as conn:
                await conn.execute(groups.insert().values(
                    group_id=group_id, revision=change.revision, state=state, avatar=avatar or None,
                    updated_at=int(time.time())))
                await conn.execute(group_changes.insert().values(**_change_values(group_id, change)))
        except IntegrityError:
            return False
        return True

    async def get(self, group_id: bytes) -> tuple[int, str] | None:
        async with self.db.read() as conn:
            row = (await conn.execute(
                sa.select(groups.c.revision, groups.c.state).where(groups.c.group_id == group_id))).first()
        return (int(row.revision), str(row.state)) if row else None

    async def update(self, group_id: bytes, expected_revision: int, state: str, change: GroupChangeRecord,
                     avatar: str = "") -> bool:
        async with self.db.write() as conn:
            result = await conn.execute(
                groups.update()
                .where(groups.c.group_id == group_id, groups.c.revision == expected_revision)
                .values(revision=change.revision, state=state, avatar=avatar or None, updated_at=int(time.time()))
            )
            if result.rowcount != 1:
                return False
            await conn.execute(group_changes.insert().values(**_change_values(group_id, change)))
        return True

    async def avatars_in_use(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        async with self.db.read() as conn:
            rows = await conn.execute(sa.select(groups.c.avatar).where(groups.c.avatar.in_(keys)))
            return {str(row.avatar) for row in rows}

    async def changes(self, group_id: bytes, from_revision: int, limit: int) -> list[GroupChangeRecord]:
        async with self.db.read() as conn:
            rows = (await conn.execute(
                sa.select(group_changes)
                .where(group_changes.c.group_id == group_id, group_changes.c.revision >= from_revision)
                .order_by(group_changes.c.revision)
                .limit(limit)
            )).all()
        return [GroupChangeRecord(r.revision, r.actor, r.timestamp_ms, r.signature, r.method, r.path, r.body)
                for r in rows]
