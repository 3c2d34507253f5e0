"""Fan-out at group scale (issue: groups of up to 1,000): one multi-recipient send to 1,000 members
(one device each) is accepted, stores the shared payload once, and reaches every connected member."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi.testclient import TestClient

from mailslot.backends.sql import tables as t
from mailslot.crypto import tokenhash
from mailslot.stores.models import Account, Device, DeviceKeys, SignedPreKey
from tests.api.delivery_support import Device as SocketDevice
from tests.api.delivery_support import access_key
from tests.api.foundation_support import call, services
from tests.api.test_multi_recipient import MRM, varint
from tests.helpers import basic

MEMBERS = 1000
CONNECTED = 40
E_PUB = bytes(range(100, 132))
CIPHERTEXT = b"one group message, stored once"


@dataclass(frozen=True)
class Member:
    aci: uuid.UUID
    password: str
    uak: bytes
    registration_id: int

    @property
    def auth(self) -> dict[str, str]:
        return basic(str(self.aci), self.password)


def bulk_members(client: TestClient, count: int) -> list[Member]:
    """Accounts written straight to the store: registering 1,000 over HTTP would be the test's whole time."""
    store = services(client).accounts.store
    now = int(time.time() * 1000)
    members = []
    key = SignedPreKey(1, b"\x05" + bytes(32), bytes(64))
    for index in range(count):
        member = Member(uuid.uuid4(), secrets.token_urlsafe(12), os.urandom(16), 1 + index % 16000)
        auth_hash, auth_salt = tokenhash.generate(member.password)
        account = Account(member.aci, f"+1666{index:07d}", uuid.uuid4(), b"\x05" + os.urandom(32), None, member.uak,
                          False, True, now)
        device = Device(1, auth_hash, auth_salt, member.registration_id, None, None, False, {"spqr": True}, now, now,
                        token_generation=secrets.token_hex(8))
        account.devices = [device]
        call(client, store.create_or_replace, account, device, [DeviceKeys("aci", key, key)], False)
        members.append(member)
    return members


def c_of(index: int) -> bytes:
    return index.to_bytes(2, "big") * 16


def at_of(index: int) -> bytes:
    return (0xF000 | index).to_bytes(2, "big") * 8


def group_payload(members: list[Member]) -> bytes:
    out = bytearray([0x23]) + varint(len(members))
    for index, member in enumerate(members):
        out += b"\x00" + member.aci.bytes + b"\x01" + member.registration_id.to_bytes(2, "big")
        out += c_of(index) + at_of(index)
    return bytes(out) + E_PUB + CIPHERTEXT


def combined_key(members: list[Member]) -> bytes:
    out = bytes(16)
    for member in members:
        out = bytes(a ^ b for a, b in zip(out, member.uak, strict=True))
    return out


def test_a_send_to_a_thousand_members_is_stored_once_and_reaches_every_connected_member(client: TestClient) -> None:
    members = bulk_members(client, MEMBERS)
    payload = group_payload(members)
    connected = members[:: MEMBERS // CONNECTED]
    sockets = [client.websocket_connect("/v1/websocket/", headers=m.auth) for m in connected]
    devices = [SocketDevice(ws.__enter__()) for ws in sockets]
    try:
        for device in devices:
            device.expect_queue_empty()
        response = client.put("/v1/messages/multi_recipient?ts=1234", content=payload,
                              headers={**access_key(combined_key(members)), "Content-Type": MRM})
        assert response.status_code == 200, response.text
        assert response.json() == {"uuids404": []}
        db = services(client).accounts.store.db  # type: ignore[attr-defined]

        async def counts() -> tuple[int, int]:
            async with db.read() as conn:
                shared = await conn.scalar(sa.select(sa.func.count()).select_from(t.shared_payloads))
                rows = await conn.scalar(sa.select(sa.func.count()).select_from(t.messages))
            return int(shared or 0), int(rows or 0)

        shared, rows = call(client, counts)
        assert shared == 1 and rows >= MEMBERS - len(connected)
        for index, device in zip(range(0, MEMBERS, MEMBERS // CONNECTED), devices, strict=True):
            (envelope,) = device.envelopes(1)
            assert envelope.content == b"\x22" + c_of(index) + at_of(index) + E_PUB + CIPHERTEXT
    finally:
        for ws in sockets:
            ws.__exit__(None, None, None)
