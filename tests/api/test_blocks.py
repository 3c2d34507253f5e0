"""Blocking (GROUPS.md "Blocking") on SQLite and PostgreSQL: identified sends from a blocked sender are
answered as usual and delivered to nobody, with no delivery receipt; unblocking restores delivery at
once; the tables hold only HMAC tokens and a sealed key."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from mailslot.backends.sql.social_tables import account_block_keys, account_blocks
from tests.api.delivery_support import Device, access_key, message, pending, send
from tests.api.foundation_support import call, services
from tests.api.test_tunnel_fast_path import Tunnel
from tests.helpers import TestAccount, register

SOCKET = "/v1/websocket/"


def block(client: TestClient, who: TestAccount, target: str) -> Any:
    return client.put(f"/v1/accounts/blocks/{target}", headers=who.auth)


def unblock(client: TestClient, who: TestAccount, target: str) -> Any:
    return client.delete(f"/v1/accounts/blocks/{target}", headers=who.auth)


def test_a_blocked_sender_is_answered_as_usual_and_nothing_is_delivered(client: TestClient) -> None:
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    assert block(client, alice, bob.aci).status_code == 204
    response = send(client, bob, alice, message(b"let me in"))
    assert response.status_code == 200 and response.json() == {"needsSync": False}
    assert pending(client, alice.aci) == 0
    assert pending(client, bob.aci) == 0  # and no delivery receipt will ever come
    # The usual checks still run first: a wrong device list is still 409, so a block cannot be probed.
    assert send(client, bob, alice, message(device=2)).status_code == 409
    assert unblock(client, alice, bob.aci).status_code == 204
    assert send(client, bob, alice, message(b"hello again")).status_code == 200
    assert pending(client, alice.aci) == 1


def test_blocking_by_pni_drops_that_account_too(client: TestClient) -> None:
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    assert block(client, alice, f"PNI:{bob.pni}").status_code == 204
    assert send(client, bob, alice, message()).status_code == 200
    assert pending(client, alice.aci) == 0


def test_blocks_are_per_account_and_sealed_sends_are_not_the_servers_to_judge(client: TestClient) -> None:
    alice, bob, carol = (register(client, f"+1555555000{i}") for i in (1, 2, 3))
    block(client, alice, bob.aci)
    assert send(client, carol, alice, message(b"from carol")).status_code == 200
    assert send(client, bob, carol, message(b"to carol")).status_code == 200
    assert pending(client, alice.aci) == 1 and pending(client, carol.aci) == 1
    # Sealed sends carry no sender; the blocker rotates its access key to stop them (README).
    assert send(client, None, alice, message(b"sealed"), headers=access_key(alice.uak)).status_code == 200
    assert pending(client, alice.aci) == 2


def test_a_connected_blocker_gets_nothing_and_unblocking_restores_delivery_at_once(client: TestClient) -> None:
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    with client.websocket_connect(SOCKET, headers=alice.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        block(client, alice, bob.aci)
        assert send(client, bob, alice, message(b"blocked")).status_code == 200
        unblock(client, alice, bob.aci)
        assert send(client, bob, alice, message(b"welcome")).status_code == 200
        (envelope,) = device.envelopes(1)
        assert envelope.content == b"welcome"


def test_the_tunnel_fast_path_drops_blocked_sends_too(client: TestClient) -> None:
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    block(client, alice, bob.aci)
    with client.websocket_connect(SOCKET, headers={**bob.auth, "X-Signal-Disable-Messages": "true"}) as ws:
        status, body, _ = Tunnel(ws).request("PUT", f"/v1/messages/{alice.aci}", {"messages": [message()]})
    assert status == 200 and body == {"needsSync": False}
    assert pending(client, alice.aci) == 0


def test_bad_requests_change_nothing(client: TestClient) -> None:
    alice = register(client, "+15555550001")
    for target in ("not-a-uuid", "PNI:xyz", "ACI:" + str(uuid.uuid4())):
        response = block(client, alice, target)
        assert response.status_code == 400 and response.json()["code"] == "bad_request"
    assert client.put(f"/v1/accounts/blocks/{uuid.uuid4()}").status_code == 401
    assert unblock(client, alice, str(uuid.uuid4())).status_code == 204  # never blocked: nothing to do
    assert _rows(client) == ([], [])


def _rows(client: TestClient) -> tuple[list[Any], list[Any]]:
    db = services(client).blocks.store.db  # type: ignore[attr-defined]

    async def read() -> tuple[list[Any], list[Any]]:
        async with db.read() as conn:
            keys = [tuple(r) for r in (await conn.execute(sa.select(account_block_keys))).all()]
            blocks = [tuple(r) for r in (await conn.execute(sa.select(account_blocks))).all()]
        return keys, blocks

    return call(client, read)


def test_a_database_dump_holds_no_readable_block_list(client: TestClient) -> None:
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    block(client, alice, bob.aci)
    block(client, alice, f"PNI:{bob.pni}")
    keys, blocks = _rows(client)
    dump = repr((keys, blocks)).encode()
    bob_aci = uuid.UUID(bob.aci)
    for needle in (bob.aci.encode(), bob_aci.bytes, bob_aci.hex.encode(), str(bob.pni).encode(), bob.number.encode()):
        assert needle not in dump
    assert len(blocks) == 2 and all(len(token) == 32 for _, token in blocks)
    # Without the server's at-rest key the stored block key is ciphertext; with it, the tokens check out.
    svc = services(client)
    (aci, sealed_key), = keys
    key = svc.delivery.keyring.open(sealed_key, b"mailslot-block-key-v1" + aci.bytes)
    assert sealed_key != key and len(key) == 32
    expected = {hmac.new(key, text.encode(), hashlib.sha256).digest() for text in (bob.aci, f"PNI:{bob.pni}")}
    assert {token for _, token in blocks} == expected


def test_deleting_the_account_deletes_its_block_list(client: TestClient) -> None:
    alice, bob = register(client, "+15555550001"), register(client, "+15555550002")
    block(client, alice, bob.aci)
    assert client.delete("/v1/accounts/me", headers=alice.auth).status_code == 204
    assert _rows(client) == ([], [])
