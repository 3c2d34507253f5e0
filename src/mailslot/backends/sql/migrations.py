"""Schema migrations: ordered steps recorded in ``schema_migrations``, run on SQLite and PostgreSQL.

Each step is a function of a synchronous connection inside one transaction. A step that has run is
never run again; a new schema change is a new step appended to ``MIGRATIONS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from mailslot.backends.sql import social_tables as social
from mailslot.backends.sql import tables as t

Step = Callable[[sa.Connection], None]


def _create(*tables: sa.Table) -> Step:
    def step(conn: sa.Connection) -> None:
        for table in tables:
            table.create(conn, checkfirst=True)

    return step


MIGRATIONS: list[tuple[int, str, Step]] = [
    (
        1,
        "accounts, devices, signed keys, verification sessions, refresh tokens",
        _create(
            t.accounts,
            t.phone_number_identifiers,
            t.devices,
            t.signed_keys,
            t.verification_sessions,
            t.refresh_tokens,
        ),
    ),
    (2, "one-time EC and KEM pre-keys", _create(t.one_time_ec_keys, t.one_time_kem_keys)),
    (3, "message queues and shared multi-recipient payloads", _create(t.messages, t.shared_payloads)),
    (4, "used device-link tokens", _create(t.used_link_tokens)),
    # The directory of sharded storage (number/PNI → account). Message inserts are idempotent on
    # ``guid``, which has been UNIQUE since step 3: that index already covers (aci, device_id, guid).
    (5, "account directory for sharded storage", _create(t.account_directory)),
    (6, "profile versions and current profiles", _create(t.profile_versions, t.profile_current)),
    # 5 and 6 are taken by sharding and media; numbers need not be contiguous, only ordered.
    (
        7,
        "groups, group change logs, block keys and block tokens",
        _create(social.groups, social.group_changes, social.account_block_keys, social.account_blocks),
    ),
]


def _apply(conn: sa.Connection) -> list[int]:
    if conn.dialect.name == "postgresql":
        # Several nodes may start at once: one migrates, the others wait and then find nothing to do.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7261601)"))
    t.schema_migrations.create(conn, checkfirst=True)
    done = {row[0] for row in conn.execute(sa.select(t.schema_migrations.c.version))}
    applied: list[int] = []
    for version, name, step in MIGRATIONS:
        if version in done:
            continue
        step(conn)
        conn.execute(
            t.schema_migrations.insert().values(version=version, name=name, applied_at=int(time.time()))
        )
        applied.append(version)
    return applied


async def migrate(engine: AsyncEngine) -> list[int]:
    """Apply every pending migration; returns the versions applied."""
    async with engine.begin() as conn:
        return await conn.run_sync(_apply)
