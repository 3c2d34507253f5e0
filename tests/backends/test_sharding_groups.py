"""Groups, block lists and profiles on sharded storage: each group on the shard of its id, block lists and
profiles on their account's shard, and all behave exactly as on one database."""

from __future__ import annotations

import asyncio
import uuid

from fastapi.testclient import TestClient

from mailslot.backends.sharding.ring import HashRing, group_key
from mailslot.backends.sql.social_tables import account_blocks, group_changes, groups
from mailslot.client import groups as g
from tests.api.delivery_support import message, pending, send
from tests.api.group_support import Group
from tests.backends import test_sharding
from tests.backends.test_sharding import rows_on
from tests.helpers import register

# The sharded app and its shards, as the sharding tests set them up.
shard_backend = test_sharding.shard_backend
sharded_client = test_sharding.sharded_client


def test_groups_live_on_the_shard_of_their_id_and_work_as_on_one_database(
    sharded_client: tuple[TestClient, list[str]],
) -> None:
    client, urls = sharded_client
    ring = HashRing(len(urls))
    created = []
    for _ in range(12):
        group = Group(client)
        group.create()
        assert group.patch(group.admin, g.set_announcements_only(True)).status_code == 200
        assert group.get(group.member).status_code == 200
        created.append(group)
    expected = [0] * len(urls)
    for group in created:
        expected[ring.shard_for(group_key(group.gid))] += 1
    counts = [asyncio.run(rows_on(url, groups)) for url in urls]
    assert counts == expected and sum(1 for c in counts if c) >= 2  # spread, each where the ring says
    assert sum(asyncio.run(rows_on(url, group_changes)) for url in urls) == 2 * len(created)
    conflict = created[0].patch(created[0].admin, g.set_announcements_only(False), revision=1)
    assert conflict.status_code == 409 and conflict.json()["revision"] == 1


def test_block_lists_live_on_the_blockers_shard(sharded_client: tuple[TestClient, list[str]]) -> None:
    client, urls = sharded_client
    ring = HashRing(len(urls))
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    assert client.put(f"/v1/accounts/blocks/{bob.aci}", headers=alice.auth).status_code == 204
    assert send(client, bob, alice, message(b"dropped")).status_code == 200
    assert pending(client, alice.aci) == 0
    home = ring.shard_for(uuid.UUID(alice.aci))
    assert [asyncio.run(rows_on(url, account_blocks)) for url in urls] == [
        1 if index == home else 0 for index in range(len(urls))
    ]


def test_profiles_live_on_the_owners_shard(sharded_client: tuple[TestClient, list[str]]) -> None:
    from mailslot.backends.sql.tables import profile_current, profile_versions
    from tests.api.test_profiles import profile_body

    client, urls = sharded_client
    ring = HashRing(len(urls))
    owners = [register(client, f"+155555500{10 + i}") for i in range(6)]
    for owner in owners:
        body = profile_body()
        assert client.put("/v1/profile", json=body, headers=owner.auth).status_code == 200
        read = client.get(f"/v1/profile/{owner.aci}/{body['version']}", headers=owners[0].auth)
        assert read.status_code == 200 and read.json()["name"] == body["name"]
    expected = [0] * len(urls)
    for owner in owners:
        expected[ring.shard_for(uuid.UUID(owner.aci))] += 1
    assert [asyncio.run(rows_on(url, profile_current)) for url in urls] == expected
    assert [asyncio.run(rows_on(url, profile_versions)) for url in urls] == expected
