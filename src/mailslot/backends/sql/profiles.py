"""Profiles in SQL: one row per (account, version) and the account's current version."""

from __future__ import annotations

import json
import time
import uuid

import sqlalchemy as sa

from mailslot.backends.sql.accounts import SqlAccountStore
from mailslot.backends.sql.database import Database
from mailslot.backends.sql.tables import profile_current, profile_versions
from mailslot.stores.profiles import CurrentProfile, VersionedProfile

# Deleting or re-registering an account deletes its profiles with the rest of its rows.
for _table in (profile_versions, profile_current):
    if (_table, "aci") not in SqlAccountStore.extra_account_tables:
        SqlAccountStore.extra_account_tables.append((_table, "aci"))


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


class SqlProfileStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, aci: uuid.UUID, version: str) -> VersionedProfile | None:
        table = profile_versions
        async with self.db.read() as conn:
            row = (await conn.execute(
                sa.select(table).where(table.c.aci == aci, table.c.version == version)
            )).first()
        if row is None:
            return None
        return VersionedProfile(
            version=row.version, commitment=bytes(row.commitment), name=_bytes(row.name), about=_bytes(row.about),
            about_emoji=_bytes(row.about_emoji), payment_address=_bytes(row.payment_address),
            phone_number_sharing=_bytes(row.phone_number_sharing), avatar=row.avatar,
        )

    async def current(self, aci: uuid.UUID) -> CurrentProfile | None:
        async with self.db.read() as conn:
            row = (await conn.execute(sa.select(profile_current).where(profile_current.c.aci == aci))).first()
        if row is None:
            return None
        return CurrentProfile(row.version, list(json.loads(row.badge_ids)))

    async def save(self, aci: uuid.UUID, profile: VersionedProfile, badge_ids: list[str]) -> None:
        now = int(time.time())
        async with self.db.write() as conn:
            await conn.execute(profile_versions.delete().where(
                profile_versions.c.aci == aci, profile_versions.c.version == profile.version))
            await conn.execute(profile_versions.insert().values(
                aci=aci, version=profile.version, commitment=profile.commitment, name=profile.name,
                about=profile.about, about_emoji=profile.about_emoji, payment_address=profile.payment_address,
                phone_number_sharing=profile.phone_number_sharing, avatar=profile.avatar, updated_at=now,
            ))
            await conn.execute(profile_current.delete().where(profile_current.c.aci == aci))
            await conn.execute(profile_current.insert().values(
                aci=aci, version=profile.version, badge_ids=json.dumps(badge_ids), updated_at=now))

    async def avatars_in_use(self, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(profile_versions.c.avatar).where(profile_versions.c.avatar.in_(keys)))
            return {str(row.avatar) for row in rows}
