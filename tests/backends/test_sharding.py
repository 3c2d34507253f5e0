"""Sharded storage (``[storage] urls``) on SQLite files and on PostgreSQL databases.

The PostgreSQL shards are the databases ``mailslot_shard_t0``… on the test server (created when missing,
emptied per test); they are gated like every PostgreSQL test (``pg_schema``: skipped when the server is
unreachable, a failure under ``CI=true``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from mailslot.app import create_app
from mailslot.backends.sharding.ring import HashRing, number_key, pni_key
from mailslot.backends.sharding.stores import ShardedAccountStore, open_sharded
from mailslot.backends.sql import tables as t
from mailslot.backends.sql.database import Database
from mailslot.config import Settings, StorageSettings, load_settings
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.stores.models import Account, Device, NewMessage, SharedPayload
from tests.api.delivery_support import pending
from tests.api.foundation_support import call, reregister, services
from tests.api.test_multi_recipient import put, received, ssv2, xor
from tests.conftest import PG_URL, TEST_NUMBERS
from tests.helpers import TestAccount, register


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shard_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _pg_admin(database: str, *statements: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    url = make_url(PG_URL).set(database=database).render_as_string(hide_password=False)
    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"), timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _reset_pg_shards(names: list[str]) -> None:
    import asyncpg

    admin_db = make_url(PG_URL).database or "postgres"
    url = make_url(PG_URL).render_as_string(hide_password=False).replace("postgresql://", "postgres://")
    conn = await asyncpg.connect(url, timeout=5)
    try:
        existing = {row[0] for row in await conn.fetch("SELECT datname FROM pg_database")}
    finally:
        await conn.close()
    for name in names:
        if name not in existing:
            try:
                await _pg_admin(admin_db, f'CREATE DATABASE "{name}"')
            except asyncpg.DuplicateDatabaseError:
                pass
        await _pg_admin(name, "DROP SCHEMA IF EXISTS public CASCADE", "CREATE SCHEMA public")


def shard_urls(backend: str, tmp_path: Path, request: pytest.FixtureRequest, count: int) -> list[str]:
    """``count`` empty shards: SQLite files under ``tmp_path`` or the PostgreSQL test databases."""
    if backend == "sqlite":
        return [f"sqlite:///{tmp_path}/shard{i}.db" for i in range(count)]
    request.getfixturevalue("pg_schema")  # skips (or fails under CI=true) when PostgreSQL is not there
    names = [f"mailslot_shard_t{i}" for i in range(count)]
    asyncio.run(_reset_pg_shards(names))
    return [make_url(PG_URL).set(database=name).render_as_string(hide_password=False) for name in names]


def storage_settings(urls: list[str], tmp_path: Path) -> StorageSettings:
    return StorageSettings(url=urls[0], urls=urls, data_dir=str(tmp_path), pool_size=3)


def sharded_app_settings(urls: list[str], tmp_path: Path) -> Settings:
    storage = {"url": urls[0], "urls": urls, "data_dir": str(tmp_path), "pool_size": 3}
    return load_settings(storage=storage, registration={"test_numbers": TEST_NUMBERS})


async def rows_on(url: str, table: sa.Table, where: Any = None) -> int:
    db = Database.from_settings(StorageSettings(url=url))
    try:
        async with db.read() as conn:
            query = sa.select(sa.func.count()).select_from(table)
            if where is not None:
                query = query.where(where)
            return int(await conn.scalar(query) or 0)
    finally:
        await db.close()


def new_account(aci: uuid.UUID, number: str) -> tuple[Account, Device]:
    now = int(time.time() * 1000)
    account = Account(
        aci=aci, number=number, pni=uuid.uuid4(), aci_identity_key=b"\x05" + bytes(32),
        pni_identity_key=b"\x05" + bytes(32), unidentified_access_key=bytes(16),
        unrestricted_unidentified_access=False, discoverable_by_phone_number=True, created_at=now,
    )
    device = Device(device_id=1, auth_hash="2.x", auth_salt="00", registration_id=1, pni_registration_id=2,
                    name=None, fetches_messages=True, capabilities={}, created_at=now, last_seen=now,
                    token_generation="g")
    return account, device


def aci_on(ring: HashRing, shard: int) -> uuid.UUID:
    while True:
        aci = uuid.uuid4()
        if ring.shard_for(aci) == shard:
            return aci


@pytest.fixture
def two_shards(shard_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    return shard_urls(shard_backend, tmp_path, request, 2)


@pytest.fixture
def sharded_client(
    shard_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[TestClient, list[str]]]:
    """An app over three shards, and the shards' URLs."""
    urls = shard_urls(shard_backend, tmp_path, request, 3)
    with TestClient(create_app(sharded_app_settings(urls, tmp_path))) as client:
        yield client, urls


def _sharded_store(client: TestClient) -> ShardedAccountStore:
    store = services(client).accounts.store.inner  # type: ignore[attr-defined]
    assert isinstance(store, ShardedAccountStore)
    return store


def test_accounts_spread_over_shards_and_are_found_by_aci_number_and_pni(
    sharded_client: tuple[TestClient, list[str]],
) -> None:
    client, urls = sharded_client
    ring = HashRing(len(urls))
    numbers = [f"+1555555{i:04d}" for i in range(10, 20)]
    accounts = [register(client, number) for number in numbers]
    store = _sharded_store(client)

    homes = {ring.shard_for(uuid.UUID(a.aci)) for a in accounts}
    assert len(homes) >= 2  # 10 random ids on 3 shards
    for account in accounts:
        aci, pni = uuid.UUID(account.aci), uuid.UUID(account.pni)
        home = ring.shard_for(aci)
        for index, url in enumerate(urls):
            expected = 1 if index == home else 0
            assert asyncio.run(rows_on(url, t.accounts, t.accounts.c.aci == aci)) == expected
            assert asyncio.run(rows_on(url, t.devices, t.devices.c.aci == aci)) == expected
        # Directory rows live on the shard of their own key.
        for key in (number_key(account.number), pni_key(pni)):
            where = t.account_directory.c.lookup_key == key
            assert asyncio.run(rows_on(urls[ring.shard_for(key)], t.account_directory, where)) == 1
        assert client.get("/v1/accounts/whoami", headers=account.auth).json()["uuid"] == account.aci
        by_number = call(client, store.get_by_number, account.number)
        by_pni = call(client, store.get_by_pni, pni)
        assert by_number is not None and by_pni is not None and by_number.aci == by_pni.aci == aci
        assert client.head(f"/v1/accounts/account/{account.aci}").status_code == 200
        assert client.head(f"/v1/accounts/account/PNI:{account.pni}").status_code == 200
        assert call(client, store.get_or_create_pni, account.number) == pni

    # Re-registering a number finds its account through the directory: same ACI.
    response, _ = reregister(client, accounts[0].number)
    assert response.status_code == 200 and response.json()["uuid"] == accounts[0].aci

    # Refresh tokens are on the account's shard: rotation and reuse detection work.
    session = client.post("/v1/auth/session", headers=accounts[1].auth)
    assert session.status_code == 200, session.text
    refresh = session.json()["refreshToken"]
    assert client.post("/v1/auth/session/refresh", json={"refreshToken": refresh}).status_code == 200
    assert client.post("/v1/auth/session/refresh", json={"refreshToken": refresh}).status_code in (401, 403)

    # Deleting an account removes its directory rows too.
    gone = accounts[2]
    assert client.delete("/v1/accounts/me", headers=gone.auth).status_code in (200, 204)
    assert call(client, store.get_by_number, gone.number) is None
    key = number_key(gone.number)
    assert asyncio.run(
        rows_on(urls[ring.shard_for(key)], t.account_directory, t.account_directory.c.lookup_key == key)
    ) == 0


def _two_on_different_shards(client: TestClient, ring: HashRing) -> tuple[TestAccount, TestAccount]:
    first = register(client, "+15555550030")
    for i in range(31, 60):
        other = register(client, f"+155555500{i}")
        if ring.shard_for(uuid.UUID(other.aci)) != ring.shard_for(uuid.UUID(first.aci)):
            return first, other
    raise AssertionError("no two accounts on different shards")


def test_multi_recipient_send_is_stored_on_each_recipients_shard(sharded_client: tuple[TestClient, list[str]]) -> None:
    client, urls = sharded_client
    ring = HashRing(len(urls))
    bob, carol = _two_on_different_shards(client, ring)
    payload = ssv2([(bob.aci, [(1, 1234)]), (carol.aci, [(1, 1234)])])
    response = put(client, payload, xor(bob, carol))
    assert response.status_code == 200, response.text

    # The 200 came after both shards committed: each holds its recipient's row and one shared payload.
    for account in (bob, carol):
        url = urls[ring.shard_for(uuid.UUID(account.aci))]
        assert asyncio.run(rows_on(url, t.messages)) == 1
        assert asyncio.run(rows_on(url, t.shared_payloads)) == 1
        assert pending(client, account.aci) == 1
    third = ({0, 1, 2} - {ring.shard_for(uuid.UUID(a.aci)) for a in (bob, carol)}).pop()
    assert asyncio.run(rows_on(urls[third], t.shared_payloads)) == 0

    for index, account in enumerate((bob, carol)):
        out = call(client, services(client).delivery.fetch, uuid.UUID(account.aci), 1, set())
        assert len(out) == 1 and Envelope.FromString(out[0].envelope).content == received(index)


async def test_apply_splits_by_shard_and_a_retry_stores_nothing_twice(two_shards: list[str], tmp_path: Path) -> None:
    urls = two_shards
    storage = await open_sharded(storage_settings(urls, tmp_path), run_migrations=True)
    try:
        ring = HashRing(2)
        acis = [aci_on(ring, 0), aci_on(ring, 1), aci_on(ring, 0)]
        for i, aci in enumerate(acis):
            await storage.accounts.create_or_replace(*new_account(aci, f"+1555000000{i}"), [], reclaimed=False)
        expires = int(time.time()) + 3600
        shared = [SharedPayload(uuid.uuid4(), b"shared bytes", expires),
                  SharedPayload(uuid.uuid4(), b"unused", expires)]
        messages = [
            NewMessage(aci, 1, uuid.uuid4(), f"envelope {i}".encode(), expires, shared[0].id, bytes(48))
            for i, aci in enumerate(acis)
        ] + [NewMessage(acis[1], 1, uuid.uuid4(), b"plain", expires)]

        first = await storage.messages.apply(messages, shared, [])
        again = await storage.messages.apply(messages, shared, [])
        assert first == again and len(set(zip(first, [m.aci for m in messages], strict=True))) == 4

        assert await rows_on(urls[0], t.messages) == 2 and await rows_on(urls[1], t.messages) == 2
        # The shared payload once on each shard that holds a recipient; the unreferenced one nowhere.
        assert await rows_on(urls[0], t.shared_payloads) == 1 and await rows_on(urls[1], t.shared_payloads) == 1
        for message, message_id in zip(messages, first, strict=True):
            queued = await storage.messages.fetch(message.aci, 1, set(), 10, int(time.time()))
            assert message_id in [q.id for q in queued]
            row = next(q for q in queued if q.id == message_id)
            assert row.guid == message.guid and row.envelope == message.envelope
        assert await storage.messages.count(acis[1], 1) == 2

        # Deletes go to the account's shard too (ids are per shard, used with the account id).
        await storage.messages.apply([], [], [(acis[1], 1, first[1])])
        assert await storage.messages.count(acis[1], 1) == 1 and await storage.messages.count(acis[0], 1) == 1
        assert set(storage.pings) == {"storage:shard-0", "storage:shard-1"}
        for ping in storage.pings.values():
            await ping()
    finally:
        await storage.close()


async def test_a_failed_shard_is_retried_and_the_batch_succeeds_once(
    two_shards: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = two_shards
    storage = await open_sharded(storage_settings(urls, tmp_path), run_migrations=True)
    try:
        ring = HashRing(2)
        acis = [aci_on(ring, 0), aci_on(ring, 1)]
        expires = int(time.time()) + 3600
        messages = [NewMessage(aci, 1, uuid.uuid4(), b"x", expires) for aci in acis]
        shard1 = storage.messages.shards[1]  # type: ignore[attr-defined]
        real_apply = shard1.apply
        calls = 0

        async def flaky(*args: Any) -> list[int]:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("shard-1 went away for a moment")
            return list(await real_apply(*args))

        monkeypatch.setattr(shard1, "apply", flaky)
        ids = await storage.messages.apply(messages, [], [])
        assert calls == 2 and len(ids) == 2
        assert await rows_on(urls[0], t.messages) == 1 and await rows_on(urls[1], t.messages) == 1
    finally:
        await storage.close()
