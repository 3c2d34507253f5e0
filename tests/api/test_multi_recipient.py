"""``PUT /v1/messages/multi_recipient`` (sealed sender v2, digest §5.2) on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from mailslot.backends.sql import tables as t
from mailslot.protocol.envelope_pb2 import Envelope
from tests.api.delivery_support import Device, access_key, pending, wait_until
from tests.api.foundation_support import add_linked_device, call, services
from tests.helpers import TestAccount, register

A, B, C, D = "+15555550085", "+15555550086", "+15555550087", "+15555550088"
MRM = "application/vnd.signal-messenger.mrm"
E_PUB = bytes(range(100, 132))
CIPHERTEXT = b"the shared ciphertext, recognisable at rest"
VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "ssv2_libsignal_vectors.json").read_text()
)["vectors"]

Devices = list[tuple[int, int]] | None  # (device id, registration id) pairs; None = excluded recipient


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def c_of(tag: int) -> bytes:
    return bytes([tag]) * 32


def at_of(tag: int) -> bytes:
    return bytes([0xF0 | tag]) * 16


def ssv2(
    entries: list[tuple[str, Devices]],
    version: int = 0x23,
    ciphertext: bytes = CIPHERTEXT,
) -> bytes:
    """An SSv2 SentMessage built by hand. ``entries``: (service id string, devices); entry i has
    c = c_of(i + 1), at = at_of(i + 1)."""
    out = bytearray([version]) + varint(len(entries))
    for index, (service_id, devices) in enumerate(entries):
        is_pni = service_id.startswith("PNI:")
        raw = uuid.UUID(service_id.removeprefix("PNI:")).bytes
        out += (bytes([1 if is_pni else 0]) + raw) if version == 0x23 else raw
        if devices is None:
            out.append(0)
            continue
        for position, (device_id, registration_id) in enumerate(devices):
            more = 0x8000 if position < len(devices) - 1 else 0
            out += bytes([device_id]) + (more | registration_id).to_bytes(2, "big")
        out += c_of(index + 1) + at_of(index + 1)
    return bytes(out) + E_PUB + ciphertext


def received(index: int, ciphertext: bytes = CIPHERTEXT) -> bytes:
    """What each device of entry ``index`` must receive: 0x22 ‖ c ‖ at ‖ e_pub ‖ ciphertext."""
    return b"\x22" + c_of(index + 1) + at_of(index + 1) + E_PUB + ciphertext


def xor(*accounts: TestAccount) -> bytes:
    out = bytes(16)
    for account in accounts:
        out = bytes(a ^ b for a, b in zip(out, account.uak, strict=True))
    return out


def put(client: TestClient, payload: bytes, key: bytes | None, query: str = "ts=1234",
        content_type: str | None = MRM, headers: dict[str, str] | None = None) -> Any:
    all_headers = dict(headers or {})
    if key is not None:
        all_headers.update(access_key(key))
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    return client.put(f"/v1/messages/multi_recipient?{query}", content=payload, headers=all_headers)


def stored(client: TestClient) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(shared_payloads.data, messages.recipient_part, messages.envelope) as stored."""
    db = services(client).accounts.store.db  # type: ignore[attr-defined]

    async def read() -> tuple[list[bytes], list[bytes], list[bytes]]:
        async with db.read() as conn:
            shared = [bytes(r[0]) for r in await conn.execute(sa.select(t.shared_payloads.c.data))]
            rows = list(await conn.execute(sa.select(t.messages.c.recipient_part, t.messages.c.envelope)))
            return shared, [bytes(r[0]) if r[0] is not None else b"" for r in rows], [bytes(r[1]) for r in rows]

    return call(client, read)


@pytest.fixture
def trio(client: TestClient) -> tuple[TestAccount, TestAccount, dict[str, str]]:
    """Bob (device 1) and Carol (devices 1 and 2, registration ids 1234 and 77); Carol's device 2 auth."""
    bob, carol = register(client, B), register(client, C)
    return bob, carol, add_linked_device(client, carol.aci, 2)


@pytest.mark.parametrize("version", [0x22, 0x23], ids=["0x22", "0x23"])
def test_each_device_gets_its_received_message_and_the_shared_part_is_stored_once(
    client: TestClient, trio: tuple[TestAccount, TestAccount, dict[str, str]], version: int
) -> None:
    bob, carol, carol_linked = trio
    payload = ssv2([(bob.aci, [(1, 1234)]), (carol.aci, [(1, 1234), (2, 77)])], version)
    response = put(client, payload, xor(bob, carol), "ts=1234&urgent=false")
    assert response.status_code == 200 and response.json() == {"uuids404": []}

    shared, parts, envelopes = stored(client)
    assert len(shared) == 1 and sorted(len(p) for p in parts) == [48, 48, 48]
    assert CIPHERTEXT not in shared[0] and all(CIPHERTEXT not in e for e in envelopes)  # sealed at rest
    purge = services(client).retention
    call(client, purge.run_once)
    assert len(stored(client)[0]) == 1  # still referenced

    delivered: list[Envelope] = []
    for account, auth, index in ((bob, bob.auth, 0), (carol, carol.auth, 1), (carol, carol_linked, 1)):
        with client.websocket_connect("/v1/websocket/", headers=auth) as ws:
            device = Device(ws)
            envelope = device.envelopes(1)[0]
            device.expect_queue_empty()
            device_id = 2 if auth is carol_linked else 1
            assert wait_until(lambda: pending(client, account.aci, device_id), 0) == 0  # noqa: B023
        assert envelope.type == Envelope.UNIDENTIFIED_SENDER
        assert envelope.content == received(index)
        assert not envelope.HasField("source_service_id") and not envelope.HasField("source_service_id_string")
        assert not envelope.HasField("source_device") and not envelope.HasField("ephemeral")
        assert envelope.destination_service_id == uuid.UUID(account.aci).bytes
        assert envelope.destination_service_id_string == account.aci
        assert envelope.client_timestamp == 1234 and envelope.urgent is False
        assert envelope.server_guid_string == str(uuid.UUID(bytes=envelope.server_guid))
        assert not envelope.HasField("shared_mrm_key")
        delivered.append(envelope)
        if len(delivered) < 3:
            call(client, purge.run_once)
            assert len(stored(client)[0]) == 1  # another device still needs it
    assert len({e.server_guid for e in delivered}) == 3
    # Acknowledged sealed-sender messages make no receipts; the shared payload goes with the last view.
    assert all(pending(client, a.aci, d) == 0 for a, d in ((bob, 1), (carol, 1), (carol, 2)))
    assert stored(client)[1] == []
    call(client, purge.run_once)
    assert stored(client)[0] == []


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def retarget(payload: bytes, mapping: dict[str, tuple[str, dict[int, tuple[int, int]]]]) -> bytes:
    """Rewrite a libsignal payload in place for registered accounts: each listed recipient's UUID and
    its devices' ids and registration ids (same lengths, so c, at, e_pub and the ciphertext stay)."""
    data = bytearray(payload)
    version = data[0]
    count, pos = _read_varint(payload, 1)
    for _ in range(count):
        if version == 0x23:
            pos += 1  # the kind byte; only ACIs are remapped
        target = mapping.get(str(uuid.UUID(bytes=bytes(data[pos : pos + 16]))))
        if target is not None:
            data[pos : pos + 16] = uuid.UUID(target[0]).bytes
        pos += 16
        if data[pos] == 0:  # excluded recipient
            pos += 1
            continue
        while True:
            device_id, word = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big")
            if target is not None:
                new_device, new_registration = target[1][device_id]
                data[pos] = new_device
                data[pos + 1 : pos + 3] = ((word & 0xC000) | new_registration).to_bytes(2, "big")
            pos += 3
            if not word & 0x8000:
                break
        pos += 48
    return bytes(data)


@pytest.mark.parametrize("index", [1, 5], ids=["0x23-with-excluded-aci-and-pni", "0x22-repeated-recipient"])
def test_libsignal_payloads_are_delivered_byte_for_byte(
    client: TestClient, trio: tuple[TestAccount, TestAccount, dict[str, str]], index: int
) -> None:
    bob, carol, _ = trio
    bob_linked = add_linked_device(client, bob.aci, 2)
    vector = VECTORS[index]
    first, second = vector["recipients"]
    payload = retarget(
        base64.b64decode(vector["payload"]),
        {
            first["service_id"]: (bob.aci, {1: (1, 1234), 2: (2, 77)}),
            second["service_id"]: (carol.aci, {127: (1, 1234)}),
        },
    )
    # Carol's second device is not addressed: first a 409 naming it, then without it.
    response = put(client, payload, xor(bob, carol))
    assert response.status_code == 409
    assert response.json() == [{"uuid": carol.aci, "devices": {"missingDevices": [2], "extraDevices": []}}]
    assert client.delete("/v1/devices/2", headers=carol.auth).status_code == 204
    response = put(client, payload, xor(bob, carol))
    assert response.status_code == 200 and response.json() == {"uuids404": []}
    expected_bob = base64.b64decode(first["received_message"])
    for auth in (bob.auth, bob_linked):
        (entity,) = client.get("/v1/messages", headers=auth).json()["messages"]
        assert entity["type"] == 6 and entity["sourceUuid"] is None and entity["destinationUuid"] == bob.aci
        assert base64.b64decode(entity["content"]) == expected_bob
    (entity,) = client.get("/v1/messages", headers=carol.auth).json()["messages"]
    content = base64.b64decode(entity["content"])
    expected_carol = second.get("received_message_sha256") or hashlib.sha256(
        base64.b64decode(second["received_message"])
    ).hexdigest()
    assert hashlib.sha256(content).hexdigest() == expected_carol
    assert len(stored(client)[0]) == 1


def test_access_key_is_the_xor_of_the_recipients_keys(
    client: TestClient, trio: tuple[TestAccount, TestAccount, dict[str, str]]
) -> None:
    bob, carol, _ = trio
    dave = register(client, D, accountAttributes={"unrestrictedUnidentifiedAccess": True})
    payload = ssv2([(bob.aci, [(1, 1234)]), (carol.aci, [(1, 1234), (2, 77)])])
    assert put(client, payload, xor(bob)).status_code == 401
    assert put(client, payload, xor(bob, carol)[:8]).status_code == 401
    assert put(client, payload, None).status_code == 401
    assert put(client, payload, xor(bob, carol, dave)).status_code == 401
    both = {"Group-Send-Token": base64.b64encode(b"token").decode()}
    assert put(client, payload, xor(bob, carol), headers=both).status_code == 400
    # Recipients with unrestricted access and excluded recipients are left out of the XOR.
    stranger = str(uuid.uuid4())
    with_extras = ssv2([(bob.aci, [(1, 1234)]), (dave.aci, [(1, 1234)]), (stranger, None), (carol.aci, None)])
    response = put(client, with_extras, xor(bob))
    assert response.status_code == 200 and response.json() == {"uuids404": []}
    assert (pending(client, bob.aci), pending(client, dave.aci)) == (1, 1)
    assert (pending(client, carol.aci, 1), pending(client, carol.aci, 2)) == (0, 0)  # excluded: skipped
    # Sealed sender may not address a PNI.
    to_pni = ssv2([(bob.aci, [(1, 1234)]), (f"PNI:{carol.pni}", [(1, 4321), (2, 78)])])
    assert put(client, to_pni, xor(bob, carol)).status_code == 401


def test_unknown_recipients_and_per_recipient_device_errors(
    client: TestClient, trio: tuple[TestAccount, TestAccount, dict[str, str]]
) -> None:
    bob, carol, _ = trio
    key = xor(bob, carol)
    unknown = ssv2([(bob.aci, [(1, 1234)]), (str(uuid.uuid4()), [(1, 1)])])
    assert put(client, unknown, xor(bob)).status_code == 404
    mismatched = ssv2([(bob.aci, [(1, 1234)]), (carol.aci, [(1, 1234), (3, 5)])])
    response = put(client, mismatched, key)
    assert response.status_code == 409
    assert response.json() == [{"uuid": carol.aci, "devices": {"missingDevices": [2], "extraDevices": [3]}}]
    # Multi-recipient order: a mismatch anywhere wins over stale registration ids elsewhere.
    mixed = ssv2([(bob.aci, [(1, 999)]), (carol.aci, [(1, 1234)])])
    response = put(client, mixed, key)
    assert response.status_code == 409
    assert response.json() == [{"uuid": carol.aci, "devices": {"missingDevices": [2], "extraDevices": []}}]
    # ... and within one recipient too (the reverse of the single-recipient rule).
    both = ssv2([(bob.aci, [(1, 1234)]), (carol.aci, [(1, 999)])])
    response = put(client, both, key)
    assert response.status_code == 409
    assert response.json() == [{"uuid": carol.aci, "devices": {"missingDevices": [2], "extraDevices": []}}]
    stale = ssv2([(bob.aci, [(1, 999)]), (carol.aci, [(1, 1234), (2, 78)])])
    response = put(client, stale, key)
    assert response.status_code == 410
    assert response.json() == [
        {"uuid": bob.aci, "devices": {"staleDevices": [1]}},
        {"uuid": carol.aci, "devices": {"staleDevices": [2]}},
    ]
    assert stored(client) == ([], [], [])  # nothing written by a refused request


def test_malformed_bodies_content_type_and_sizes(
    client: TestClient, trio: tuple[TestAccount, TestAccount, dict[str, str]]
) -> None:
    bob, carol, _ = trio
    key = xor(bob)
    good = ssv2([(bob.aci, [(1, 1234)])])
    assert put(client, b"", key).status_code == 400
    assert put(client, good[:40], key).status_code == 400  # truncated
    assert put(client, b"\x23" + varint(0) + E_PUB + CIPHERTEXT, key).status_code == 400  # no recipients
    assert put(client, ssv2([(bob.aci, None)]), key).status_code == 400  # only excluded ones
    assert put(client, ssv2([(bob.aci, [(1, 1234), (1, 1234)])]), key).status_code == 400  # a device twice
    assert put(client, b"\x33" + good[1:], key).status_code == 400  # unknown version
    assert put(client, good, key, content_type="application/octet-stream").status_code == 415
    assert put(client, good, key, content_type=None).status_code == 415
    assert put(client, good, key, query="ts=-1").status_code == 400
    limit = 96 * 1024
    overhead = 1 + 48 + 32  # version, c ‖ at, e_pub
    assert put(client, ssv2([(bob.aci, [(1, 1234)])], ciphertext=b"x" * (limit - overhead + 1)), key).status_code == 413
    assert stored(client) == ([], [], [])
    at_limit = put(client, ssv2([(bob.aci, [(1, 1234)])], ciphertext=b"x" * (limit - overhead)), key)
    assert at_limit.status_code == 200
    (entity,) = client.get("/v1/messages", headers=bob.auth).json()["messages"]
    assert len(base64.b64decode(entity["content"])) == limit


def test_online_multi_recipient_reaches_only_connected_devices(
    client: TestClient, trio: tuple[TestAccount, TestAccount, dict[str, str]]
) -> None:
    bob, carol, _ = trio
    payload = ssv2([(bob.aci, [(1, 1234)]), (carol.aci, [(1, 1234), (2, 77)])])
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        assert put(client, payload, xor(bob, carol), "ts=99&online=true").status_code == 200
        envelope = device.envelopes(1)[0]
        assert envelope.content == received(0) and envelope.type == 6 and not envelope.HasField("ephemeral")
    assert stored(client) == ([], [], [])  # neither the shared part nor any view was stored
    assert client.get("/v1/messages", headers=carol.auth).json()["messages"] == []
