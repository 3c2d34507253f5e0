"""One-time pre-keys are handed out at most once under concurrent fetches (digest §4.2), on SQLite and
PostgreSQL: many asyncio tasks take bundles at once through the store and through the key service."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from mailslot.app import create_app
from mailslot.config import Settings
from mailslot.crypto import xeddsa
from mailslot.services.container import Services
from mailslot.stores.models import DeviceBundle
from mailslot.wiring import build_services
from tests.helpers import b64, register

LAST_RESORT_ID = 9999


@dataclass
class Target:
    aci: uuid.UUID
    uak: bytes


def seed(settings: Settings, one_time_keys: int) -> Target:
    """Register an account over HTTP and upload ``one_time_keys`` EC and KEM keys (ids 1..n)."""
    with TestClient(create_app(settings)) as client:
        account = register(client, "+15555550061")
        identity = account.aci_identity
        body = {
            "preKeys": [{"keyId": i, "publicKey": b64(xeddsa.generate_keypair()[1])}
                        for i in range(1, one_time_keys + 1)],
            "pqPreKeys": [identity.signed_kem(i) for i in range(1, one_time_keys + 1)],
            "signedPreKey": identity.signed_ec(5000),
            "pqLastResortPreKey": identity.signed_kem(LAST_RESORT_ID),
        }
        response = client.put("/v2/keys", json=body, headers=account.auth)
        assert response.status_code == 204, response.text
        assert client.get("/v2/keys", headers=account.auth).json() == {
            "count": one_time_keys, "pqCount": one_time_keys}
    return Target(uuid.UUID(account.aci), account.uak)


@pytest.fixture
def hundred(settings: Settings) -> Target:
    return seed(settings, 100)


@pytest.fixture
def ten(settings: Settings) -> Target:
    return seed(settings, 10)


async def run_concurrently(count: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Start ``count`` tasks that all wait on one event, then release them together."""
    start = asyncio.Event()

    async def one(i: int) -> Any:
        await start.wait()
        return await make(i)

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    await asyncio.sleep(0)
    start.set()
    return await asyncio.gather(*tasks)


def taken_ids(bundles: list[DeviceBundle]) -> tuple[list[int], list[int]]:
    ec = [b.pre_key.key_id for b in bundles if b.pre_key is not None]
    kem = [b.pq_pre_key.key_id for b in bundles if b.pq_pre_key.key_id != LAST_RESORT_ID]
    return ec, kem


async def counts(svc: Services, aci: uuid.UUID) -> tuple[int, int]:
    return await svc.keys.keys.counts(aci, "aci", 1)


async def test_concurrent_take_bundle_hands_out_distinct_keys(settings: Settings, hundred: Target) -> None:
    svc = await build_services(settings)
    try:
        results = await run_concurrently(50, lambda _: svc.keys.keys.take_bundle(hundred.aci, "aci", [1]))
        bundles = [b for result in results for b in result]
        assert len(bundles) == 50 and all(b.device_id == 1 for b in bundles)
        ec, kem = taken_ids(bundles)
        assert len(ec) == 50 and len(set(ec)) == 50, sorted(ec)
        assert len(kem) == 50 and len(set(kem)) == 50, sorted(kem)
        assert set(ec) <= set(range(1, 101)) and set(kem) <= set(range(1, 101))
        assert await counts(svc, hundred.aci) == (100 - len(ec), 100 - len(kem)) == (50, 50)
    finally:
        await svc.close()


async def test_concurrent_fetches_through_the_service(settings: Settings, hundred: Target) -> None:
    """The whole fetch path (access check, then take), anonymous with the access key as senders do."""
    svc = await build_services(settings)
    try:
        results = await run_concurrently(
            50, lambda _: svc.keys.fetch_bundle(None, hundred.uak, str(hundred.aci), "1"))
        devices = [r["devices"][0] for r in results]
        ec = [d["preKey"]["keyId"] for d in devices if d["preKey"] is not None]
        kem = [d["pqPreKey"]["keyId"] for d in devices]
        assert len(ec) == len(set(ec)) == 50
        assert len(kem) == len(set(kem)) == 50 and LAST_RESORT_ID not in kem
        assert await counts(svc, hundred.aci) == (50, 50)
    finally:
        await svc.close()


async def test_two_server_nodes_fetching_at_once(settings: Settings, hundred: Target) -> None:
    """Two service containers (two engines and pools, as two nodes sharing one database)."""
    first, second = await build_services(settings), await build_services(settings, run_migrations=False)
    try:
        results = await run_concurrently(
            60, lambda i: (first if i % 2 else second).keys.keys.take_bundle(hundred.aci, "aci", [1]))
        ec, kem = taken_ids([b for result in results for b in result])
        assert len(ec) == len(set(ec)) == 60
        assert len(kem) == len(set(kem)) == 60
        assert await counts(first, hundred.aci) == (40, 40)
    finally:
        await first.close()
        await second.close()


async def test_more_fetches_than_keys(settings: Settings, ten: Target) -> None:
    svc = await build_services(settings)
    try:
        results = await run_concurrently(30, lambda _: svc.keys.keys.take_bundle(ten.aci, "aci", [1]))
        bundles = [b for result in results for b in result]
        assert len(bundles) == 30
        ec, kem = taken_ids(bundles)
        assert sorted(ec) == list(range(1, 11))
        assert sorted(kem) == list(range(1, 11))
        assert sum(b.pre_key is None for b in bundles) == 20
        assert sum(b.pq_pre_key.key_id == LAST_RESORT_ID for b in bundles) == 20
        assert await counts(svc, ten.aci) == (0, 0)
        # the last-resort key is kept: later fetches still get it
        again = await svc.keys.keys.take_bundle(ten.aci, "aci", [1])
        assert again[0].pq_pre_key.key_id == LAST_RESORT_ID and again[0].pre_key is None
    finally:
        await svc.close()
