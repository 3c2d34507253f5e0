"""Opens the configured storage: one database (``[storage] url``) or shards (``[storage] urls``).

The composition root (:mod:`mailslot.wiring`) takes the stores from here and never looks at how many
databases lie behind them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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
from mailslot.stores.blocks import BlockStore
from mailslot.stores.groups import GroupStore
from mailslot.stores.interfaces import (
    AccountStore,
    KeyStore,
    MessageStore,
    RefreshTokenStore,
    VerificationSessionStore,
)
from mailslot.stores.profiles import ProfileStore

Purge = Callable[[int], Awaitable[int]]


@dataclass
class Storage:
    accounts: AccountStore
    sessions: VerificationSessionStore
    refresh_tokens: RefreshTokenStore
    keys: KeyStore
    messages: MessageStore
    # Group states and logs (GROUPS.md); None only while a storage layout has no group store yet.
    groups: GroupStore | None = None
    blocks: BlockStore | None = None
    profiles: ProfileStore | None = None
    # name → purge(now): expired rows the retention job deletes
    purges: dict[str, Purge] = field(default_factory=dict)
    # name → ping(): raises when that database cannot be reached
    pings: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def close(self) -> None:
        for closer in reversed(self.closers):
            await closer()


async def open_single(settings: StorageSettings, run_migrations: bool) -> Storage:
    db = Database.from_settings(settings)
    try:
        if run_migrations:
            await migrate(db.engine)
    except Exception:
        await db.close()
        raise
    accounts = SqlAccountStore(db)
    sessions = SqlVerificationSessionStore(db)
    refresh = SqlRefreshTokenStore(db)
    messages = SqlMessageStore(db)
    return Storage(
        accounts=accounts,
        sessions=sessions,
        refresh_tokens=refresh,
        keys=SqlKeyStore(db),
        messages=messages,
        groups=SqlGroupStore(db),
        blocks=SqlBlockStore(db),
        profiles=SqlProfileStore(db),
        purges={
            "verification_sessions": sessions.delete_expired,
            "refresh_tokens": refresh.delete_expired,
            "messages": messages.delete_expired,
            "used_link_tokens": accounts.delete_expired_link_tokens,
        },
        pings={"storage": db.ping},
        closers=[db.close],
    )


async def open_storage(settings: StorageSettings, run_migrations: bool = True) -> Storage:
    """The stores for ``settings``: sharded when ``urls`` is set, else the one database at ``url``."""
    if settings.urls:
        from mailslot.backends.sharding.stores import open_sharded

        return await open_sharded(settings, run_migrations)
    return await open_single(settings, run_migrations)
