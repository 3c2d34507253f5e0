"""Delivery over the authenticated socket (digest §6.4, §6.5, §5.3 receipts) on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from mailslot.backends.sql import tables as t
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.transport import delivery as socket_delivery
from tests.api.delivery_support import (
    Device,
    access_key,
    message,
    pending,
    receive_frame,
    send,
    wait_until,
)
from tests.api.foundation_support import add_linked_device, call, custom_client, services
from tests.helpers import register

A, B, C = "+15555550081", "+15555550082", "+15555550083"
DAY = 86400.0
MANY = {"messages": {"capacity": 100_000, "permit_seconds": 0.0001}}
SOCKET = "/v1/websocket/"


def closed_with(ws: WebSocketTestSession) -> int:
    with pytest.raises(WebSocketDisconnect) as closed:
        while True:
            receive_frame(ws)
    return closed.value.code


def test_backlog_in_order_bounded_in_flight_one_queue_empty_then_live(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with custom_client(backend, tmp_path, request, delivery={"max_in_flight": 4}, rate_limits=MANY) as client:
        alice, bob, carol = register(client, A), register(client, B), register(client, C)
        expected: dict[str, list[bytes]] = {alice.aci: [], carol.aci: []}
        # More than two fetch batches (100), interleaved from two senders.
        for i in range(110):
            for sender in (alice, carol):
                content = f"{sender.number} backlog {i}".encode()
                assert send(client, sender, bob, message(content)).status_code == 200
                expected[sender.aci].append(content)
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            first = device.deliveries(4)
            device.assert_silent()  # a fifth delivery waits until one of the four is answered
            received = []
            for delivery in first:
                device.answer(delivery)
                received.append(Envelope.FromString(delivery.body))
            received += device.envelopes(46)
            for i in range(3):  # sent while the backlog is still streaming
                content = f"late {i}".encode()
                send(client, alice, bob, message(content))
                expected[alice.aci].append(content)
            received += device.envelopes(220 + 3 - 50)
            assert device.queue_empties == 0  # not before the backlog is through
            device.expect_queue_empty()
            for i in range(5):  # live, on the same connection
                content = f"live {i}".encode()
                send(client, carol, bob, message(content))
                expected[carol.aci].append(content)
            received += device.envelopes(5)
            assert device.keepalive() == 200
            device.assert_silent()
            assert device.queue_empties == 1  # exactly once per connection
            assert wait_until(lambda: pending(client, bob.aci), 0) == 0
    by_sender: dict[str, list[bytes]] = {alice.aci: [], carol.aci: []}
    for envelope in received:
        by_sender[envelope.source_service_id_string].append(envelope.content)
    assert by_sender == expected  # every message once, in send order per sender
    assert len({e.server_guid for e in received}) == len(received) == 228


def test_any_2xx_deletes_anything_else_stays_queued_for_the_next_connection(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    for i in range(4):
        send(client, alice, bob, message(f"m{i}".encode()))
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        before = int(time.time() * 1000)
        deliveries = device.deliveries(4)
        for delivery in deliveries:  # PUT /api/v1/message, a positive id, the server's timestamp header
            assert delivery.verb == "PUT" and delivery.id > 0
            (header,) = delivery.headers
            name, value = header.split(":")
            assert name.lower() == "x-signal-timestamp" and before <= int(value) <= int(time.time() * 1000)
        assert len({d.id for d in deliveries}) == 4
        first = [Envelope.FromString(d.body) for d in deliveries]
        assert [e.content for e in first] == [b"m0", b"m1", b"m2", b"m3"]
        for delivery, status in zip(deliveries, (204, 500, 200, 404), strict=True):
            device.answer(delivery, status)
        device.expect_queue_empty()
        assert wait_until(lambda: pending(client, bob.aci), 2) == 2
        assert pending(client, alice.aci) == 2  # receipts only for the acknowledged two
        # A refused envelope is not offered again on this connection; new ones still are.
        send(client, alice, bob, message(b"m4"))
        assert device.envelopes(1)[0].content == b"m4"
        assert wait_until(lambda: pending(client, alice.aci), 3) == 3
        device.assert_silent()
        assert pending(client, bob.aci) == 2
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        again = device.envelopes(2)
        assert [e.content for e in again] == [b"m1", b"m3"]
        assert [e.server_guid for e in again] == [first[1].server_guid, first[3].server_guid]
        device.expect_queue_empty()
        assert wait_until(lambda: pending(client, bob.aci), 0) == 0
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        device.assert_silent()
    assert pending(client, alice.aci) == 5


def test_displacement_4409_hands_unanswered_deliveries_to_the_new_socket(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    send(client, alice, bob, message(b"one"))
    send(client, alice, bob, message(b"two"))
    with client.websocket_connect(SOCKET, headers=bob.auth) as older:
        old_device = Device(older)
        unanswered = [Envelope.FromString(d.body) for d in old_device.deliveries(2)]
        old_device.expect_queue_empty()
        with client.websocket_connect(SOCKET, headers=bob.auth) as newer:
            assert closed_with(older) == 4409
            device = Device(newer)
            again = device.envelopes(2)
            assert [e.server_guid for e in again] == [e.server_guid for e in unanswered]
            assert [e.content for e in again] == [b"one", b"two"]
            device.expect_queue_empty()
            send(client, alice, bob, message(b"three"))
            assert device.envelopes(1)[0].content == b"three"
            assert wait_until(lambda: pending(client, bob.aci), 0) == 0


def test_only_a_message_socket_of_the_same_device_displaces(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    linked = add_linked_device(client, bob.aci, 2)
    with client.websocket_connect(SOCKET, headers=bob.auth) as one:
        first = Device(one)
        first.expect_queue_empty()
        quiet_headers = {**bob.auth, "X-Signal-Disable-Messages": "true"}
        with client.websocket_connect(SOCKET, headers=quiet_headers) as quiet, \
                client.websocket_connect(SOCKET, headers=linked) as two:
            second = Device(two)
            second.expect_queue_empty()
            response = send(client, alice, bob, message(b"to one", 1, 1234), message(b"to two", 2, 77))
            assert response.status_code == 200
            assert first.envelopes(1)[0].content == b"to one"
            assert second.envelopes(1)[0].content == b"to two"
            silent = Device(quiet)
            assert silent.keepalive() == 200
            silent.assert_silent()
            assert wait_until(lambda: (pending(client, bob.aci, 1), pending(client, bob.aci, 2)), (0, 0)) == (0, 0)


def test_receipts_go_to_every_sender_device_and_name_the_acknowledging_device(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    alice_linked = add_linked_device(client, alice.aci, 2)
    bob_linked = add_linked_device(client, bob.aci, 2)
    response = send(client, alice, bob, message(b"x", 1, 1234), message(b"x", 2, 77), timestamp=424242)
    assert response.json() == {"needsSync": True}
    with client.websocket_connect(SOCKET, headers=bob_linked) as ws:
        device = Device(ws)
        original = device.envelopes(1)[0]
        device.expect_queue_empty()
        assert wait_until(lambda: pending(client, alice.aci, 1), 1) == 1
    assert pending(client, alice.aci, 2) == 1
    with client.websocket_connect(SOCKET, headers=alice.auth) as ws:
        device = Device(ws)
        receipt = device.envelopes(1)[0]
        device.expect_queue_empty()
        assert wait_until(lambda: pending(client, alice.aci, 1), 0) == 0
    assert receipt.type == Envelope.SERVER_DELIVERY_RECEIPT
    assert receipt.source_service_id == uuid.UUID(bob.aci).bytes and receipt.source_service_id_string == bob.aci
    assert receipt.source_device == 2
    assert receipt.client_timestamp == 424242
    assert receipt.destination_service_id == uuid.UUID(alice.aci).bytes
    assert receipt.destination_service_id_string == alice.aci
    assert receipt.urgent is False and not receipt.content
    assert len(receipt.server_guid) == 16 and receipt.server_guid != original.server_guid
    # Acknowledging a receipt makes no receipt of its own.
    assert (pending(client, bob.aci, 1), pending(client, bob.aci, 2)) == (1, 0)
    # Bob's other copy, acknowledged by polling: a receipt naming device 1, for both of Alice's devices.
    polled = client.get("/v1/messages", headers=bob.auth).json()["messages"]
    assert client.delete(f"/v1/messages/uuid/{polled[0]['guid']}", headers=bob.auth).status_code == 204
    receipts = client.get("/v1/messages", headers=alice_linked).json()["messages"]
    assert [(r["type"], r["sourceUuid"], r["sourceDevice"], r["timestamp"]) for r in receipts] == [
        (5, bob.aci, 2, 424242),
        (5, bob.aci, 1, 424242),
    ]
    assert pending(client, alice.aci, 1) == 1


def test_receipt_for_a_message_to_the_pni_names_the_pni(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    body = {"messages": [message(b"to the pni", registration=4321)], "timestamp": 77}
    assert client.put(f"/v1/messages/PNI:{bob.pni}", json=body, headers=alice.auth).status_code == 200
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        envelope = device.envelopes(1)[0]
        assert wait_until(lambda: pending(client, alice.aci), 1) == 1
    assert envelope.destination_service_id == b"\x01" + uuid.UUID(bob.pni).bytes
    assert envelope.destination_service_id_string == f"PNI:{bob.pni}"
    receipt = client.get("/v1/messages", headers=alice.auth).json()["messages"]
    assert [(r["type"], r["sourceUuid"], r["timestamp"]) for r in receipt] == [(5, f"PNI:{bob.pni}", 77)]


def test_no_receipt_for_sealed_sender_or_for_messages_to_oneself(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    alice_linked = add_linked_device(client, alice.aci, 2)
    assert send(client, None, bob, message(b"sealed", kind=6), headers=access_key(bob.uak)).status_code == 200
    assert send(client, alice, alice, message(b"sync", device=2, registration=77)).status_code == 200
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        assert Device(ws).envelopes(1)[0].content == b"sealed"
        assert wait_until(lambda: pending(client, bob.aci), 0) == 0
    with client.websocket_connect(SOCKET, headers=alice_linked) as ws:
        sync = Device(ws).envelopes(1)[0]
        assert wait_until(lambda: pending(client, alice.aci, 2), 0) == 0
    assert sync.content == b"sync" and sync.source_device == 1
    # Receipts would have been committed with the deletes above.
    assert (pending(client, alice.aci, 1), pending(client, alice.aci, 2)) == (0, 0)
    # The same path does make one for an identified message (so the checks above can fail).
    send(client, alice, bob, message(b"identified"))
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        Device(ws).envelopes(1)
        assert wait_until(lambda: pending(client, alice.aci, 1), 1) == 1


def test_ephemeral_reaches_only_a_connected_device_and_is_never_queued(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    linked = add_linked_device(client, bob.aci, 2)
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        both = (message(b"now", 1, 1234), message(b"now", 2, 77))
        assert send(client, alice, bob, *both, online=True).status_code == 200
        envelope = device.envelopes(1, status=500)[0]  # refused: an ephemeral message is not kept
        assert envelope.content == b"now" and not envelope.HasField("ephemeral")
        device.assert_silent()
    assert (pending(client, bob.aci, 1), pending(client, bob.aci, 2)) == (0, 0)
    assert client.get("/v1/messages", headers=linked).json()["messages"] == []
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        device.assert_silent()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Move wall-clock time (``time.time``) forward by a given number of seconds."""
    real = time.time
    offset = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])

    def shift(seconds: float) -> None:
        offset[0] = seconds

    yield shift


def test_expired_envelopes_are_not_delivered_and_are_purged(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, clock: Callable[[float], None]
) -> None:
    with custom_client(backend, tmp_path, request, delivery={"message_ttl_days": 1}) as client:
        alice, bob = register(client, A), register(client, B)
        send(client, alice, bob, message(b"old"))
        purge = services(client).retention
        clock(0.5 * DAY)
        polled = client.get("/v1/messages", headers=bob.auth).json()["messages"]
        assert [base64.b64decode(m["content"]) for m in polled] == [b"old"]  # within its day
        assert call(client, purge.run_once)["messages"] == 0
        assert pending(client, bob.aci) == 1
        clock(1.5 * DAY)
        send(client, alice, bob, message(b"new"))  # a day of its own from now
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            assert [e.content for e in device.envelopes(1, status=500)] == [b"new"]
            device.expect_queue_empty()
            device.assert_silent()
        assert client.get("/v1/messages", headers=bob.auth).json()["messages"][0]["content"] == base64.b64encode(
            b"new"
        ).decode()
        assert call(client, purge.run_once)["messages"] >= 1
        assert pending(client, bob.aci) == 1  # only "new" is left in the table


def _stored_envelopes(client: TestClient) -> list[bytes]:
    db = services(client).accounts.store.db  # type: ignore[attr-defined]

    async def read() -> list[bytes]:
        async with db.read() as conn:
            rows = await conn.execute(sa.select(t.messages.c.envelope).order_by(t.messages.c.id))
            return [bytes(row[0]) for row in rows]

    return call(client, read)


def test_envelopes_are_sealed_at_rest_under_the_current_key_and_keys_rotate(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    key1, key2, wrong = (base64.b64encode(bytes([n]) * 32).decode() for n in (1, 2, 3))
    secrets = [b"first secret, sealed under key one", b"second secret, under key two", b"third, key one again"]

    def client_with(truncate: bool, **delivery: Any) -> AbstractContextManager[TestClient]:
        return custom_client(backend, tmp_path, request, truncate=truncate, delivery=delivery)

    with client_with(True, at_rest_keys={1: key1}) as client:
        alice, bob = register(client, A), register(client, B)
        send(client, alice, bob, message(secrets[0]))
        (row,) = _stored_envelopes(client)
        assert secrets[0] not in row and uuid.UUID(alice.aci).bytes not in row and alice.aci.encode() not in row
        assert row[:2] == (1).to_bytes(2, "big")  # the key id, so keys can rotate
    with client_with(False, at_rest_keys={1: key1, 2: key2}) as client:
        send(client, alice, bob, message(secrets[1]))
        rows = _stored_envelopes(client)
        assert rows[1][:2] == (2).to_bytes(2, "big") and secrets[1] not in rows[1]
    with client_with(False, at_rest_keys={1: key1, 2: key2}, at_rest_current=1) as client:
        send(client, alice, bob, message(secrets[2]))
        assert _stored_envelopes(client)[2][:2] == (1).to_bytes(2, "big")
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            assert [e.content for e in device.envelopes(3, status=500)] == secrets
            device.expect_queue_empty()
    # Key 1 replaced by a wrong one: its envelopes fail to open and are never served garbled.
    with client_with(False, at_rest_keys={1: wrong, 2: key2}) as client:
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            assert [e.content for e in device.envelopes(1)] == [secrets[1]]
            device.expect_queue_empty()
            device.assert_silent()


def test_live_messages_beyond_the_in_memory_hand_over_are_read_back_in_order(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket_delivery, "MAX_HANDOVER", 2)
    with custom_client(backend, tmp_path, request, delivery={"max_in_flight": 1}, rate_limits=MANY) as client:
        alice, bob = register(client, A), register(client, B)
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            device.expect_queue_empty()
            contents = [f"live {i}".encode() for i in range(12)]
            for content in contents:  # the device is not reading: the hand-over overflows
                assert send(client, alice, bob, message(content)).status_code == 200
            received = device.envelopes(12)
            assert [e.content for e in received] == contents
            assert len({e.server_guid for e in received}) == 12
            device.assert_silent()
            assert device.queue_empties == 1  # re-reading the queue is not a new connection
            assert wait_until(lambda: pending(client, bob.aci), 0) == 0


def test_an_unanswered_delivery_times_out_frees_its_slot_and_stays_queued(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(socket_delivery, "ACK_TIMEOUT_SECONDS", 0.4)
    with custom_client(backend, tmp_path, request, delivery={"max_in_flight": 1}) as client:
        alice, bob = register(client, A), register(client, B)
        send(client, alice, bob, message(b"one"))
        send(client, alice, bob, message(b"two"))
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            (unanswered,) = device.deliveries(1)
            assert device.envelopes(1)[0].content == b"two"  # the only slot came back after the timeout
            device.expect_queue_empty()
            device.answer(unanswered)  # too late to count
            assert wait_until(lambda: pending(client, bob.aci), 1) == 1
            device.assert_silent()
            assert pending(client, bob.aci) == 1
        with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
            device = Device(ws)
            again = device.envelopes(1)[0]
            assert again.content == b"one" and again.server_guid == Envelope.FromString(unanswered.body).server_guid
            assert wait_until(lambda: pending(client, bob.aci), 0) == 0


def test_stories_reach_only_sockets_that_ask_for_them(client: TestClient) -> None:
    alice, bob = register(client, A), register(client, B)
    story = {"messages": [message(b"a story")], "timestamp": 9}
    assert client.put(f"/v1/messages/{bob.aci}?story=true", json=story).status_code == 200
    with client.websocket_connect(SOCKET, headers=bob.auth) as ws:
        device = Device(ws)
        device.expect_queue_empty()
        device.assert_silent()
        assert wait_until(lambda: pending(client, bob.aci), 0) == 0  # dropped for this socket
    assert client.put(f"/v1/messages/{bob.aci}?story=true", json=story).status_code == 200
    with client.websocket_connect(SOCKET, headers={**bob.auth, "X-Signal-Receive-Stories": "true"}) as ws:
        device = Device(ws)
        envelope = device.envelopes(1)[0]
        assert envelope.story is True and envelope.content == b"a story"
        assert not envelope.HasField("source_service_id")
        assert wait_until(lambda: pending(client, bob.aci), 0) == 0
    assert pending(client, alice.aci) == 0  # no receipt for a story
