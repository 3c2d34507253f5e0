"""``mailslot shards rebalance``: adding a shard moves about 1/N of the accounts, with all their rows.

Runs on SQLite files and on the PostgreSQL shard databases of :mod:`tests.backends.test_sharding`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mailslot.backends.sharding.rebalance import rebalance, rebalance_databases
from mailslot.backends.sharding.ring import HashRing
from mailslot.backends.sharding.stores import open_shard_databases, open_sharded
from mailslot.backends.sql import tables as t
from mailslot.cli import main
from mailslot.config import StorageSettings
from mailslot.storage_setup import open_single
from mailslot.stores.models import NewMessage, PreKey, RefreshToken, SharedPayload, SignedPreKey, VerificationSession
from tests.backends.test_sharding import new_account, rows_on, shard_urls, storage_settings

ACCOUNTS = 120


@dataclass
class Seeded:
    aci: uuid.UUID
    number: str
    pni: uuid.UUID
    guids: list[uuid.UUID]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def four_shards(tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    """Four empty shards; the tests seed the first three and then add the fourth."""
    return shard_urls(str(request.param), tmp_path, request, 4)


def _key(n: int) -> SignedPreKey:
    return SignedPreKey(n, bytes([n % 256]) * 33, b"s" * 64)


async def seed(urls: list[str], tmp_path: Path, count: int = ACCOUNTS, single: bool = False) -> list[Seeded]:
    """``count`` accounts with keys, queued messages (one referencing a payload shared by all), a refresh
    token, a verification session and a used link token each, on the shards of ``urls`` (``single``: in
    the one database ``urls[0]`` of an unsharded set-up, which has no directory)."""
    if single:
        storage = await open_single(StorageSettings(url=urls[0], data_dir=str(tmp_path)), run_migrations=True)
    else:
        storage = await open_sharded(storage_settings(urls, tmp_path), run_migrations=True)
    seeded: list[Seeded] = []
    now = int(time.time())
    expires = now + 3600
    shared = SharedPayload(uuid.uuid4(), b"one payload for all", expires)
    try:
        messages: list[NewMessage] = []
        for i in range(count):
            aci, number = uuid.uuid4(), f"+1666{i:07d}"
            account, device = new_account(aci, number)
            account.pni = await storage.accounts.get_or_create_pni(number)
            await storage.accounts.create_or_replace(account, device, [], reclaimed=False)
            await storage.keys.store_keys(
                aci, "aci", 1, [PreKey(k, bytes(33)) for k in (1, 2, 3)], [_key(9)], _key(1), _key(2)
            )
            guids = [uuid.uuid4(), uuid.uuid4()]
            messages.append(NewMessage(aci, 1, guids[0], b"head", expires, shared.id, bytes(48)))
            messages.append(NewMessage(aci, 1, guids[1], f"plain {i}".encode(), expires))
            await storage.refresh_tokens.insert(RefreshToken(f"rt{i}", f"fam{i}", aci, 1, expires, False))
            await storage.sessions.insert(VerificationSession(f"session{i}", number, now, now, expires))
            assert await storage.accounts.use_link_token(f"link{i}", expires)
            seeded.append(Seeded(aci, number, account.pni, guids))
        await storage.messages.apply(messages, [shared], [])
    finally:
        await storage.close()
    return seeded


async def verify(urls: list[str], tmp_path: Path, seeded: list[Seeded]) -> None:
    """Every account and its rows are readable through the ring over ``urls``, each row exactly once."""
    storage = await open_sharded(storage_settings(urls, tmp_path), run_migrations=True)
    ring = HashRing(len(urls))
    now = int(time.time())
    try:
        for i, item in enumerate(seeded):
            account = await storage.accounts.get_by_aci(item.aci)
            assert account is not None and account.number == item.number and len(account.devices) == 1
            by_number = await storage.accounts.get_by_number(item.number)
            by_pni = await storage.accounts.get_by_pni(item.pni)
            assert by_number is not None and by_pni is not None and by_number.aci == by_pni.aci == item.aci
            assert await storage.accounts.get_or_create_pni(item.number) == item.pni
            queued = await storage.messages.fetch(item.aci, 1, set(), 10, now)
            assert [m.guid for m in queued] == item.guids  # in their original order
            assert queued[0].shared_data == b"one payload for all" and queued[1].envelope == f"plain {i}".encode()
            assert await storage.keys.counts(item.aci, "aci", 1) == (3, 1)
            assert await storage.keys.get_signed_keys(item.aci, "aci", 1) is not None
            token = await storage.refresh_tokens.mark_used(item.aci, f"rt{i}")
            assert token is not None and not token.used
            assert await storage.sessions.get(f"session{i}") is not None
            assert not await storage.accounts.use_link_token(f"link{i}", now + 60)  # still known as used
        homes = [ring.shard_for(item.aci) for item in seeded]
        for index, url in enumerate(urls):
            assert await rows_on(url, t.accounts) == homes.count(index)
            assert await rows_on(url, t.messages) == 2 * homes.count(index)
            assert await rows_on(url, t.shared_payloads) == (1 if index in homes else 0)
            assert await rows_on(url, t.refresh_tokens) == homes.count(index)
    finally:
        await storage.close()


async def snapshot(urls: list[str]) -> list[dict[str, int]]:
    counts: list[dict[str, int]] = []
    for url in urls:
        per_table: dict[str, int] = {}
        for table in t.metadata.sorted_tables:
            try:
                per_table[table.name] = await rows_on(url, table)
            except sa.exc.DBAPIError:
                per_table[table.name] = -1  # not created on this shard
        counts.append(per_table)
    return counts


def expected_moves(seeded: list[Seeded]) -> set[uuid.UUID]:
    old, new = HashRing(3), HashRing(4)
    return {s.aci for s in seeded if old.shard_for(s.aci) != new.shard_for(s.aci)}


async def test_adding_a_shard_moves_about_a_quarter_and_everything_stays_readable(
    four_shards: list[str], tmp_path: Path
) -> None:
    seeded = await seed(four_shards[:3], tmp_path)
    lines: list[str] = []

    report = await rebalance(storage_settings(four_shards, tmp_path), out=lines.append, batch=10)

    moving = expected_moves(seeded)
    assert 0.12 <= len(moving) / len(seeded) <= 0.40
    assert report.total_accounts == len(moving) and all(target == 3 for _, target in report.accounts)
    assert any(line.startswith("shard-0 → shard-3: ") and line.endswith(" accounts") for line in lines), lines
    assert lines[-1].startswith(f"done: moved {len(moving)} accounts")
    assert report.keyed_rows.get("verification_sessions", 0) > 0
    await verify(four_shards, tmp_path, seeded)

    # A second run finds nothing to do.
    again = await rebalance(storage_settings(four_shards, tmp_path), out=lambda _: None)
    assert again.total_accounts == 0 and sum(again.keyed_rows.values()) == 0


async def test_dry_run_counts_and_changes_nothing(four_shards: list[str], tmp_path: Path) -> None:
    seeded = await seed(four_shards[:3], tmp_path, count=40)
    before = await snapshot(four_shards)
    lines: list[str] = []

    report = await rebalance(storage_settings(four_shards, tmp_path), dry_run=True, out=lines.append)

    assert report.dry_run and report.total_accounts == len(expected_moves(seeded))
    assert any("would move" in line for line in lines)
    assert await snapshot(four_shards) == before


async def test_an_interrupted_rebalance_completes_when_run_again(four_shards: list[str], tmp_path: Path) -> None:
    seeded = await seed(four_shards[:3], tmp_path, count=60)
    settings = storage_settings(four_shards, tmp_path)

    def interrupt(line: str) -> None:
        if line.endswith(" accounts"):
            raise KeyboardInterrupt  # the operator's ^C after the first batch

    with pytest.raises(KeyboardInterrupt):
        await rebalance(settings, out=interrupt, batch=3)
    await rebalance(settings, out=lambda _: None, batch=3)
    await verify(four_shards, tmp_path, seeded)


async def test_a_crash_after_the_copy_and_before_the_delete_is_repaired_by_a_rerun(
    four_shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = await seed(four_shards[:3], tmp_path, count=60)
    dbs = await open_shard_databases(storage_settings(four_shards, tmp_path), run_migrations=True)
    try:
        moving = expected_moves(seeded)
        source = min(HashRing(3).shard_for(s.aci) for s in seeded if s.aci in moving)  # the first one moved
        real_write = dbs[source].write

        def failing_write() -> AbstractAsyncContextManager[Any]:
            raise ConnectionError("the source went away after the target committed")

        monkeypatch.setattr(dbs[source], "write", failing_write)
        with pytest.raises(ConnectionError):
            await rebalance_databases(dbs, out=lambda _: None, batch=5)
        # The first batch is on both shards now: copied, not yet deleted.
        assert await rows_on(four_shards[3], t.accounts) > 0
        monkeypatch.setattr(dbs[source], "write", real_write)
        await rebalance_databases(dbs, out=lambda _: None, batch=5)
    finally:
        await asyncio.gather(*(db.close() for db in dbs))
    await verify(four_shards, tmp_path, seeded)


def test_cli_dry_run_then_rebalance(
    four_shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = asyncio.run(seed(four_shards[:3], tmp_path, count=40))
    config = tmp_path / "mailslot.toml"
    urls = ", ".join(f'"{url}"' for url in four_shards)
    config.write_text(f'[storage]\nurls = [{urls}]\ndata_dir = "{tmp_path}"\npool_size = 3\n')
    moving = len(expected_moves(seeded))

    assert main(["shards", "rebalance", "--config", str(config), "--dry-run"]) == 0
    assert f"done: would move {moving} accounts across 4 shards" in capsys.readouterr().out

    assert main(["shards", "rebalance", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"done: moved {moving} accounts across 4 shards" in out and "→ shard-3: " in out
    asyncio.run(verify(four_shards, tmp_path, seeded))


async def test_a_single_database_becomes_shard_0_and_gets_its_directory(four_shards: list[str], tmp_path: Path) -> None:
    urls = four_shards[:2]
    seeded = await seed(urls, tmp_path, count=30, single=True)
    assert await rows_on(urls[0], t.account_directory) == 0

    dry = await rebalance(storage_settings(urls, tmp_path), dry_run=True, out=lambda _: None)
    assert dry.directory_written == 2 * len(seeded)
    assert await rows_on(urls[0], t.account_directory) == 0

    report = await rebalance(storage_settings(urls, tmp_path), out=lambda _: None)
    moving = {s.aci for s in seeded if HashRing(2).shard_for(s.aci) == 1}
    assert report.total_accounts == len(moving) and report.directory_written == 2 * len(seeded)
    await verify(urls, tmp_path, seeded)
