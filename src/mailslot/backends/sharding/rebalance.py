"""``mailslot shards rebalance``: move rows to the shard the ring now assigns them (offline).

Run it with every node stopped, after appending a URL to ``[storage] urls``. For each shard it finds the
accounts whose ACI now hashes to another shard and moves each batch of them with all their rows to the
target in one transaction there; only after that commit are they deleted from the source. Rows keyed by
something else (directory entries, PNI allocations, verification sessions, used link tokens, groups) move
the same way by their own key. Copies skip rows the target already has (by primary key, messages by
GUID), so an interrupted run is simply run again.

Finally it writes the number/PNI directory entries that are missing, so that a single database turns into
shard-0 of a sharded setup: set ``urls = [<the old url>, <new urls>…]`` and run it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from mailslot.backends.sharding.ring import (
    HashRing,
    Key,
    group_key,
    link_token_key,
    number_key,
    pni_key,
    session_key,
    shard_label,
)
from mailslot.backends.sharding.stores import open_shard_databases
from mailslot.backends.sql import social_tables as social
from mailslot.backends.sql import tables as t
from mailslot.backends.sql.accounts import SqlAccountStore
from mailslot.backends.sql.database import Database
from mailslot.config import StorageSettings

BATCH = 100


def _keyed_tables() -> list[tuple[sa.Table, str, Callable[[Any], Key]]]:
    """Tables whose rows live on the shard of a key of their own: (table, key column, ring key)."""
    return [
        (t.account_directory, "lookup_key", str),
        (t.phone_number_identifiers, "number", number_key),
        (t.verification_sessions, "id", session_key),
        (t.used_link_tokens, "token_hash", link_token_key),
        (social.groups, "group_id", group_key),
        (social.group_changes, "group_id", group_key),
    ]


def _account_tables() -> list[tuple[sa.Table, str]]:
    """Tables moved with an account, parents first (deleted in the reverse order)."""
    extra = list(SqlAccountStore.extra_account_tables)
    ordered = [table for table in reversed(t.ACCOUNT_TABLES) if table is not t.messages]
    return [(table, "aci") for table in ordered] + extra


@dataclass
class RebalanceReport:
    # (source, target) → accounts moved (or that would move, on a dry run)
    accounts: dict[tuple[int, int], int] = field(default_factory=dict)
    # table name → rows moved by their own key
    keyed_rows: dict[str, int] = field(default_factory=dict)
    # directory entries that were missing or pointed elsewhere (accounts written before sharding)
    directory_written: int = 0
    dry_run: bool = False

    @property
    def total_accounts(self) -> int:
        return sum(self.accounts.values())


def _insert(conn: AsyncConnection, table: sa.Table, conflict: Sequence[sa.Column[Any]]) -> Any:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    return insert(table).on_conflict_do_nothing(index_elements=list(conflict))


async def _copy_rows(conn: AsyncConnection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` unless their primary key (messages: GUID) is there already.

    A conflict on another unique column (say, a number held by another account) is not skipped: the
    transaction fails and nothing is deleted from the source."""
    if not rows:
        return
    conflict = [table.c.guid] if table is t.messages else list(table.primary_key.columns)
    await conn.execute(_insert(conn, table, conflict), rows)


async def _table_exists(db: Database, table: sa.Table) -> bool:
    async with db.engine.connect() as conn:
        return bool(await conn.run_sync(lambda sync: sa.inspect(sync).has_table(table.name)))


async def _distinct(db: Database, table: sa.Table, column: str) -> list[Any]:
    async with db.read() as conn:
        result = await conn.execute(sa.select(table.c[column]).distinct().order_by(table.c[column]))
        return [row[0] for row in result]


async def _move_accounts(source: Database, target: Database, acis: list[uuid.UUID]) -> None:
    """Copy the accounts with all their rows in one target transaction, then delete them at the source."""
    tables = _account_tables()
    copied: list[tuple[sa.Table, list[dict[str, Any]]]] = []
    async with source.read() as conn:
        for table, column in tables:
            result = await conn.execute(sa.select(table).where(table.c[column].in_(acis)))
            copied.append((table, [dict(row._mapping) for row in result]))
        result = await conn.execute(sa.select(t.messages).where(t.messages.c.aci.in_(acis)).order_by(t.messages.c.id))
        # Ids are the source's; the target numbers them anew, in the same order.
        messages = [{k: v for k, v in row._mapping.items() if k != "id"} for row in result]
        shared_ids = sorted({m["shared_id"] for m in messages if m["shared_id"] is not None})
        shared: list[dict[str, Any]] = []
        for start in range(0, len(shared_ids), 500):
            result = await conn.execute(
                sa.select(t.shared_payloads).where(t.shared_payloads.c.id.in_(shared_ids[start : start + 500]))
            )
            shared.extend(dict(row._mapping) for row in result)
    async with target.write() as conn:
        for table, rows in copied:
            await _copy_rows(conn, table, rows)
        await _copy_rows(conn, t.shared_payloads, shared)
        await _copy_rows(conn, t.messages, messages)
    async with source.write() as conn:
        await conn.execute(t.messages.delete().where(t.messages.c.aci.in_(acis)))
        for table, column in reversed(tables):
            await conn.execute(table.delete().where(table.c[column].in_(acis)))
        if shared_ids:
            referenced = sa.select(t.messages.c.shared_id).where(t.messages.c.shared_id == t.shared_payloads.c.id)
            await conn.execute(
                t.shared_payloads.delete().where(t.shared_payloads.c.id.in_(shared_ids), ~referenced.exists())
            )


async def _move_keyed(source: Database, target: Database, table: sa.Table, column: str, keys: list[Any]) -> int:
    async with source.read() as conn:
        rows = [dict(row._mapping) for row in await conn.execute(sa.select(table).where(table.c[column].in_(keys)))]
    async with target.write() as conn:
        await _copy_rows(conn, table, rows)
    async with source.write() as conn:
        await conn.execute(table.delete().where(table.c[column].in_(keys)))
    return len(rows)


async def _backfill_directory(dbs: Sequence[Database], ring: HashRing, dry_run: bool, batch: int) -> int:
    """Write the number/PNI directory entries that are missing or stale (accounts of a database that was
    the only one before ``urls`` was set have none); returns how many were (or would be) written."""
    written = 0
    for db in dbs:
        if not await _table_exists(db, t.accounts):
            continue
        async with db.read() as conn:
            rows = (await conn.execute(sa.select(t.accounts.c.aci, t.accounts.c.number, t.accounts.c.pni))).all()
        for start in range(0, len(rows), batch * 5):
            wanted: dict[int, dict[str, uuid.UUID]] = {}
            for aci, number, pni in rows[start : start + batch * 5]:
                for key in ([number_key(number)] if number else []) + ([pni_key(pni)] if pni else []):
                    wanted.setdefault(ring.shard_for(key), {})[key] = aci
            for shard, entries in wanted.items():
                target = dbs[shard]
                if await _table_exists(target, t.account_directory):
                    async with target.read() as conn:
                        result = await conn.execute(
                            sa.select(t.account_directory.c.lookup_key, t.account_directory.c.aci)
                            .where(t.account_directory.c.lookup_key.in_(list(entries)))
                        )
                        present = {row.lookup_key: row.aci for row in result}
                else:
                    present = {}
                missing = {key: aci for key, aci in entries.items() if present.get(key) != aci}
                written += len(missing)
                if missing and not dry_run:
                    await SqlAccountStore(target).put_directory(missing)
    return written


async def rebalance_databases(
    dbs: Sequence[Database], dry_run: bool = False, out: Callable[[str], None] = print, batch: int = BATCH
) -> RebalanceReport:
    """Move every row of ``dbs`` (shard ``i`` = ``dbs[i]``) to its shard on the ring over all of them."""
    ring = HashRing(len(dbs))
    report = RebalanceReport(dry_run=dry_run)
    for index, db in enumerate(dbs):
        if not await _table_exists(db, t.accounts):
            continue  # a new shard that was never migrated (dry run): nothing on it
        moves: dict[int, list[uuid.UUID]] = {}
        for aci in await _distinct(db, t.accounts, "aci"):
            target = ring.shard_for(aci)
            if target != index:
                moves.setdefault(target, []).append(aci)
        for target, acis in sorted(moves.items()):
            arrow = f"{shard_label(index)} → {shard_label(target)}"
            report.accounts[(index, target)] = len(acis)
            if dry_run:
                out(f"{arrow}: {len(acis)} accounts would move")
                continue
            for start in range(0, len(acis), batch):
                chunk = acis[start : start + batch]
                await _move_accounts(db, dbs[target], chunk)
                out(f"{arrow}: {start + len(chunk)}/{len(acis)} accounts")
        for table, column, key in _keyed_tables():
            if not await _table_exists(db, table):
                continue
            by_target: dict[int, list[Any]] = {}
            for value in await _distinct(db, table, column):
                target = ring.shard_for(key(value))
                if target != index:
                    by_target.setdefault(target, []).append(value)
            for target, values in sorted(by_target.items()):
                moved = 0
                if dry_run:
                    moved = len(values)
                else:
                    for start in range(0, len(values), batch * 5):
                        moved += await _move_keyed(db, dbs[target], table, column, values[start : start + batch * 5])
                report.keyed_rows[table.name] = report.keyed_rows.get(table.name, 0) + moved
                verb = "would move" if dry_run else "moved"
                out(f"{shard_label(index)} → {shard_label(target)}: {table.name} {verb} {moved} rows")
    report.directory_written = await _backfill_directory(dbs, ring, dry_run, batch)
    if report.directory_written:
        verb = "would write" if dry_run else "wrote"
        out(f"directory: {verb} {report.directory_written} missing number/PNI entries")
    verb = "would move" if dry_run else "moved"
    keyed = ", ".join(f"{name} {count}" for name, count in sorted(report.keyed_rows.items())) or "none"
    out(f"done: {verb} {report.total_accounts} accounts across {len(dbs)} shards; rows by key: {keyed}")
    return report


async def rebalance(
    settings: StorageSettings, dry_run: bool = False, out: Callable[[str], None] = print, batch: int = BATCH
) -> RebalanceReport:
    """Open the shards of ``settings.urls`` (migrating them, unless a dry run) and rebalance them."""
    if not settings.urls:
        raise ValueError("[storage] urls is empty: there are no shards to rebalance")
    dbs = await open_shard_databases(settings, run_migrations=not dry_run)
    try:
        return await rebalance_databases(dbs, dry_run, out, batch)
    finally:
        await asyncio.gather(*(db.close() for db in dbs))
