"""Per-device message queues in SQL."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from mailslot.backends.sql import tables as t
from mailslot.backends.sql.database import Database
from mailslot.stores.models import NewMessage, SharedPayload, StoredMessage

_m = t.messages
_s = t.shared_payloads

_SELECT = (
    sa.select(_m.c.id, _m.c.guid, _m.c.envelope, _m.c.expires_at, _m.c.shared_id, _m.c.recipient_part, _s.c.data)
    .select_from(_m.outerjoin(_s, _m.c.shared_id == _s.c.id))
)


# Inserts are idempotent: a row whose GUID is already queued (a retried group commit, a shard that had
# committed before another failed) is skipped and the queued row's id is returned instead.
_INSERT = postgresql.insert(_m).on_conflict_do_nothing(index_elements=[_m.c.guid]).returning(_m.c.id, _m.c.guid)
_INSERT_SHARED = postgresql.insert(_s).on_conflict_do_nothing(index_elements=[_s.c.id])


class GuidConflict(Exception):
    """A GUID is already queued for another device: not a retry of the same message."""


def _stored(row: Any) -> StoredMessage:
    return StoredMessage(row.id, row.guid, row.envelope, row.expires_at, row.shared_id, row.data, row.recipient_part)


def _existing_ids(messages: list[NewMessage], missing: list[uuid.UUID], rows: Any) -> dict[uuid.UUID, int]:
    """Ids of the rows already queued under the GUIDs in ``missing``, checked to be the same queue's."""
    owners = {m.guid: (m.aci, m.device_id) for m in messages}
    found: dict[uuid.UUID, int] = {}
    for row in rows:
        if owners.get(row.guid) != (row.aci, row.device_id):
            raise GuidConflict(str(row.guid))
        found[row.guid] = int(row.id)
    absent = set(missing) - found.keys()
    if absent:  # a row skipped for a conflict on another unique column
        raise GuidConflict(str(next(iter(absent))))
    return found


class SqlMessageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def apply(
        self, messages: list[NewMessage], shared: list[SharedPayload], deletes: list[tuple[uuid.UUID, int, int]]
    ) -> list[int]:
        """Inserts and deletes of many requests in one transaction (group commit); returns the new ids."""
        if self.db.dialect == "sqlite":
            return await self._apply_inline(messages, shared, deletes)
        async with self.db.write() as conn:
            if shared:
                await conn.execute(
                    _INSERT_SHARED, [{"id": p.id, "data": p.data, "expires_at": p.expires_at} for p in shared]
                )
            ids: list[int] = []
            if messages:
                rows = [
                    {"aci": m.aci, "device_id": m.device_id, "guid": m.guid, "envelope": m.envelope,
                     "expires_at": m.expires_at, "shared_id": m.shared_id, "recipient_part": m.recipient_part}
                    for m in messages
                ]
                # executemany with RETURNING: one cached statement whatever the batch size. Skipped rows
                # return nothing, so ids are matched by GUID.
                result = await conn.execute(_INSERT, rows)
                by_guid = {row.guid: int(row.id) for row in result}
                missing = [m.guid for m in messages if m.guid not in by_guid]
                if missing:
                    existing = await conn.execute(
                        sa.select(_m.c.id, _m.c.guid, _m.c.aci, _m.c.device_id).where(_m.c.guid.in_(missing))
                    )
                    by_guid.update(_existing_ids(messages, missing, existing))
                ids = [by_guid[m.guid] for m in messages]
            if deletes:
                await conn.execute(_m.delete().where(_m.c.id.in_([message_id for _, _, message_id in deletes])))
            return ids

    async def _apply_inline(
        self, messages: list[NewMessage], shared: list[SharedPayload], deletes: list[tuple[uuid.UUID, int, int]]
    ) -> list[int]:
        """The same transaction as :meth:`apply` on SQLite's own connection, on the loop's thread.

        The column encodings are SQLAlchemy's for SQLite: UUIDs as 32 hex characters.
        """
        ids: list[int] = []
        async with self.db.inline_sqlite() as conn:
            if shared:
                conn.executemany(
                    "INSERT INTO shared_payloads (id, data, expires_at) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    [(p.id.hex, p.data, p.expires_at) for p in shared],
                )
            for m in messages:
                row = conn.execute(
                    "INSERT INTO messages (aci, device_id, guid, envelope, expires_at, shared_id, recipient_part)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (guid) DO NOTHING RETURNING id",
                    (m.aci.hex, m.device_id, m.guid.hex, m.envelope, m.expires_at,
                     m.shared_id.hex if m.shared_id else None, m.recipient_part),
                ).fetchone()
                if row is None:  # already queued: a retry
                    row = conn.execute(
                        "SELECT id FROM messages WHERE guid = ? AND aci = ? AND device_id = ?",
                        (m.guid.hex, m.aci.hex, m.device_id),
                    ).fetchone()
                    if row is None:
                        raise GuidConflict(str(m.guid))
                ids.append(int(row[0]))
            for start in range(0, len(deletes), 500):
                chunk = [message_id for _, _, message_id in deletes[start : start + 500]]
                conn.execute(f"DELETE FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk)  # noqa: S608
        return ids

    async def fetch(
        self, aci: uuid.UUID, device_id: int, exclude: set[int], limit: int, now: int
    ) -> list[StoredMessage]:
        query = _SELECT.where(_m.c.aci == aci, _m.c.device_id == device_id, _m.c.expires_at > now)
        if exclude:
            query = query.where(_m.c.id.not_in(list(exclude)))
        async with self.db.read() as conn:
            result = await conn.execute(query.order_by(_m.c.id).limit(limit))
            return [_stored(row) for row in result]

    async def delete(self, aci: uuid.UUID, device_id: int, ids: list[int]) -> int:
        if not ids:
            return 0
        async with self.db.write() as conn:
            result = await conn.execute(
                _m.delete().where(_m.c.aci == aci, _m.c.device_id == device_id, _m.c.id.in_(ids))
            )
            return int(result.rowcount or 0)

    async def take_by_guid(self, aci: uuid.UUID, device_id: int, guid: uuid.UUID) -> StoredMessage | None:
        async with self.db.write() as conn:
            row = (
                await conn.execute(_SELECT.where(_m.c.aci == aci, _m.c.device_id == device_id, _m.c.guid == guid))
            ).first()
            if row is None:
                return None
            await conn.execute(_m.delete().where(_m.c.id == row.id))
            return _stored(row)

    async def delete_device(self, aci: uuid.UUID, device_id: int | None) -> None:
        query = _m.delete().where(_m.c.aci == aci)
        if device_id is not None:
            query = query.where(_m.c.device_id == device_id)
        async with self.db.write() as conn:
            await conn.execute(query)

    async def count(self, aci: uuid.UUID, device_id: int) -> int:
        async with self.db.read() as conn:
            value = await conn.scalar(
                sa.select(sa.func.count()).select_from(_m).where(_m.c.aci == aci, _m.c.device_id == device_id)
            )
            return int(value or 0)

    async def delete_expired(self, now: int) -> int:
        async with self.db.write() as conn:
            result = await conn.execute(_m.delete().where(_m.c.expires_at <= now))
            # A shared payload goes once no queued message refers to it any more (or it expired).
            referenced = sa.select(_m.c.shared_id).where(_m.c.shared_id == _s.c.id).exists()
            shared = await conn.execute(_s.delete().where(sa.or_(_s.c.expires_at <= now, ~referenced)))
            return int(result.rowcount or 0) + int(shared.rowcount or 0)
