"""Sending, queueing and delivering messages (digest §5, §6.4) on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from mailslot.backends.sql import tables as t
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketResponseMessage
from tests.api.foundation_support import add_linked_device, call, custom_client, services
from tests.helpers import TestAccount, b64, register

A, B, C = "+15555550071", "+15555550072", "+15555550073"


def message(content: bytes = b"hello", device: int = 1, registration: int = 1234, kind: int = 1) -> dict[str, Any]:
    return {
        "type": kind,
        "destinationDeviceId": device,
        "destinationRegistrationId": registration,
        "content": b64(content),
    }


def send(
    client: TestClient,
    sender: TestAccount | None,
    to: TestAccount,
    *messages: dict[str, Any],
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Any:
    body = {"messages": list(messages) or [message()], "timestamp": 1000, **extra}
    auth = sender.auth if sender else {}
    return client.put(f"/v1/messages/{to.aci}", json=body, headers={**auth, **(headers or {})})


class Device:
    """A receiving socket: reads pushed envelopes and answers them."""

    def __init__(self, ws: WebSocketTestSession) -> None:
        self.ws = ws

    def next_request(self) -> Any:
        while True:
            frame = WebSocketMessage.FromString(self.ws.receive_bytes())
            if frame.type == WebSocketMessage.REQUEST:
                return frame.request

    def answer(self, request: Any, status: int = 200) -> None:
        reply = WebSocketMessage(
            type=WebSocketMessage.RESPONSE, response=WebSocketResponseMessage(id=request.id, status=status)
        )
        self.ws.send_bytes(reply.SerializeToString())

    def envelopes(self, count: int, status: int = 200) -> list[Envelope]:
        out = []
        while len(out) < count:
            request = self.next_request()
            self.answer(request, 200 if request.path != "/api/v1/message" else status)
            if request.path == "/api/v1/message":
                out.append(Envelope.FromString(request.body))
        return out


@pytest.fixture
def pair(client: TestClient) -> tuple[TestAccount, TestAccount]:
    return register(client, A), register(client, B)


def test_identified_send_is_queued_and_delivered_in_order_then_queue_empty(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    for i in range(5):
        assert send(client, alice, bob, message(f"m{i}".encode())).json() == {"needsSync": False}
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        device = Device(ws)
        received = device.envelopes(5)
        assert [e.content for e in received] == [f"m{i}".encode() for i in range(5)]
        envelope = received[0]
        assert envelope.type == 1 and envelope.client_timestamp == 1000 and envelope.source_device == 1
        assert envelope.source_service_id == uuid.UUID(alice.aci).bytes
        assert envelope.source_service_id_string == alice.aci
        assert envelope.destination_service_id == uuid.UUID(bob.aci).bytes
        assert envelope.destination_service_id_string == bob.aci
        assert str(uuid.UUID(bytes=envelope.server_guid)) == envelope.server_guid_string
        assert not envelope.HasField("ephemeral") and not envelope.HasField("shared_mrm_key")
        assert device.next_request().path == "/api/v1/queue/empty"
        # live delivery on the same socket
        send(client, alice, bob, message(b"live"))
        assert device.envelopes(1)[0].content == b"live"


def test_acknowledged_is_deleted_refused_is_redelivered_with_same_guid(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    send(client, alice, bob, message(b"one"))
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        refused = Device(ws).envelopes(1, status=500)[0]
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        device = Device(ws)
        again = device.envelopes(1)[0]
        assert again.server_guid == refused.server_guid
        assert device.next_request().path == "/api/v1/queue/empty"
        time.sleep(0.2)
    store = services(client).delivery
    assert call(client, store.pending_count, uuid.UUID(bob.aci), 1) == 0


def test_receipt_goes_to_every_device_of_the_sender_after_the_ack(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    add_linked_device(client, alice.aci, 2)
    send(client, alice, bob, message(b"x"))
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        Device(ws).envelopes(1)
        time.sleep(0.2)
    polled = client.get("/v1/messages", headers=alice.auth).json()["messages"]
    assert len(polled) == 1 and polled[0]["type"] == 5
    assert polled[0]["sourceUuid"] == bob.aci and polled[0]["timestamp"] == 1000
    linked_store = services(client).delivery
    assert call(client, linked_store.pending_count, uuid.UUID(alice.aci), 2) == 1


def test_sealed_sender_carries_no_sender_and_makes_no_receipt(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    key = {"Unidentified-Access-Key": base64.b64encode(bob.uak).decode()}
    assert send(client, None, bob, message(kind=6)).status_code == 401
    wrong = {"Unidentified-Access-Key": base64.b64encode(bytes(16)).decode()}
    assert send(client, None, bob, message(kind=6), headers=wrong).status_code == 401
    short = {"Unidentified-Access-Key": base64.b64encode(bytes(8)).decode()}
    assert send(client, None, bob, message(kind=6), headers=short).status_code == 401
    assert send(client, None, bob, message(kind=6), headers=key).status_code == 200
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        envelope = Device(ws).envelopes(1)[0]
        time.sleep(0.2)
    assert envelope.type == 6
    assert not envelope.HasField("source_service_id") and not envelope.HasField("source_service_id_string")
    assert not envelope.HasField("source_device")
    assert client.get("/v1/messages", headers=alice.auth).json()["messages"] == []


def test_device_list_rules_and_bad_input(client: TestClient, pair: tuple[TestAccount, TestAccount]) -> None:
    alice, bob = pair
    response = send(client, alice, bob, message(device=2))
    assert response.status_code == 409 and response.json() == {"missingDevices": [1], "extraDevices": [2]}
    response = send(client, alice, bob, message(registration=7))
    assert response.status_code == 410 and response.json() == {"staleDevices": [1]}
    response = send(client, alice, bob, message(registration=7), message(device=3))
    assert response.status_code == 410  # stale wins over extra
    assert send(client, alice, bob, message(content=b"x" * (96 * 1024 + 1))).status_code == 413
    for bad in (message(kind=5), message(kind=2), {**message(), "content": "***"}):
        assert send(client, alice, bob, bad).status_code == 422
    assert send(client, alice, bob, message(), message()).status_code == 422  # the same device twice
    assert client.put(f"/v1/messages/{bob.aci}", json={"messages": []}, headers=alice.auth).status_code == 422
    stranger = TestAccount("+1", "", str(uuid.uuid4()), "", alice.aci_identity, alice.pni_identity, bytes(16))
    assert send(client, alice, stranger).status_code == 404
    sealed = {"Unidentified-Access-Key": base64.b64encode(bytes(16)).decode()}
    assert send(client, None, stranger, headers=sealed).status_code == 401  # no existence oracle
    assert call(client, services(client).delivery.pending_count, uuid.UUID(bob.aci), 1) == 0


def test_sync_messages_and_needs_sync(client: TestClient, pair: tuple[TestAccount, TestAccount]) -> None:
    alice, bob = pair
    linked = add_linked_device(client, alice.aci, 2)
    assert send(client, alice, bob).json() == {"needsSync": True}
    # to oneself: every other device, not the sending one
    assert send(client, alice, alice, message(device=1)).status_code == 409
    response = send(client, alice, alice, message(device=2, registration=77))
    assert response.status_code == 200 and response.json() == {"needsSync": False}
    polled = client.get("/v1/messages", headers=linked).json()["messages"]
    assert [m["sourceDevice"] for m in polled] == [1]
    assert (
        client.put(
            f"/v1/messages/PNI:{alice.pni}", json={"messages": [message(device=2, registration=78)]}, headers=alice.auth
        ).status_code
        == 403
    )


def test_pni_destination_uses_the_pni_registration_id(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    body = {"messages": [message(registration=1234)]}
    assert client.put(f"/v1/messages/PNI:{bob.pni}", json=body, headers=alice.auth).status_code == 410
    body = {"messages": [message(registration=4321)]}
    assert client.put(f"/v1/messages/PNI:{bob.pni}", json=body, headers=alice.auth).status_code == 200
    polled = client.get("/v1/messages", headers=bob.auth).json()["messages"]
    assert polled[0]["destinationUuid"] == f"PNI:{bob.pni}"


def test_ephemeral_messages_reach_only_connected_devices(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    assert send(client, alice, bob, message(b"offline"), online=True).status_code == 200
    assert client.get("/v1/messages", headers=bob.auth).json()["messages"] == []
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        device = Device(ws)
        assert device.next_request().path == "/api/v1/queue/empty"
        send(client, alice, bob, message(b"online"), online=True, urgent=False)
        envelope = device.envelopes(1)[0]
        assert envelope.content == b"online" and not envelope.HasField("ephemeral") and envelope.urgent is False


def test_newer_socket_displaces_the_older_with_4409(client: TestClient, pair: tuple[TestAccount, TestAccount]) -> None:
    alice, bob = pair
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as first:
        assert Device(first).next_request().path == "/api/v1/queue/empty"
        with client.websocket_connect("/v1/websocket/", headers=bob.auth) as second:
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    first.receive_bytes()
            assert closed.value.code == 4409
            device = Device(second)
            assert device.next_request().path == "/api/v1/queue/empty"
            send(client, alice, bob, message(b"to the new one"))
            assert device.envelopes(1)[0].content == b"to the new one"


def test_socket_with_messages_disabled_gets_no_deliveries(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    send(client, alice, bob)
    headers = {**bob.auth, "X-Signal-Disable-Messages": "true"}
    with client.websocket_connect("/v1/websocket/", headers=headers) as ws:
        keepalive = WebSocketMessage(type=WebSocketMessage.REQUEST)
        keepalive.request.verb, keepalive.request.path, keepalive.request.id = "GET", "/v1/keepalive", 9
        ws.send_bytes(keepalive.SerializeToString())
        frame = WebSocketMessage.FromString(ws.receive_bytes())
        assert frame.type == WebSocketMessage.RESPONSE and frame.response.id == 9  # nothing pushed first
    assert call(client, services(client).delivery.pending_count, uuid.UUID(bob.aci), 1) == 1


def test_long_poll_returns_when_a_message_arrives_and_delete_acknowledges(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    started = time.monotonic()
    assert client.get("/v1/messages?timeout=1", headers=bob.auth).json() == {"messages": [], "more": False}
    assert time.monotonic() - started >= 0.9
    result: dict[str, Any] = {}

    def poll() -> None:
        result["response"] = client.get("/v1/messages?timeout=10", headers=bob.auth)
        result["at"] = time.monotonic()

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    sent_at = time.monotonic()
    send(client, alice, bob, message(b"wake up"))
    poller.join(timeout=10)
    assert result["at"] - sent_at < 1.0  # woken by the send, not by the 10 s timeout
    entity = result["response"].json()["messages"][0]
    assert base64.b64decode(entity["content"]) == b"wake up" and entity["sourceUuid"] == alice.aci
    assert client.delete(f"/v1/messages/uuid/{entity['guid']}", headers=bob.auth).status_code == 204
    assert client.get("/v1/messages", headers=bob.auth).json()["messages"] == []
    receipts = client.get("/v1/messages", headers=alice.auth).json()["messages"]
    assert [m["type"] for m in receipts] == [5]
    assert client.get("/v1/messages?timeout=61", headers=bob.auth).status_code == 422


def test_envelopes_are_sealed_at_rest_and_expire(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    with custom_client(backend, tmp_path, request, delivery={"message_ttl_days": 1}) as client:
        alice, bob = register(client, A), register(client, B)
        secret = b"a very recognisable plaintext"
        send(client, alice, bob, message(secret))
        db = services(client).accounts.store.db

        async def envelopes() -> list[bytes]:
            async with db.read() as conn:
                return [row[0] for row in await conn.execute(sa.select(t.messages.c.envelope))]

        stored = call(client, envelopes)
        assert len(stored) == 1 and secret not in stored[0]
        purge = services(client).retention
        assert call(client, purge.run_once)["messages"] == 0
        import mailslot.services.delivery as delivery_module

        real = delivery_module.time.time
        delivery_module.time.time = lambda: real() + 2 * 86400  # type: ignore[assignment]
        try:
            assert client.get("/v1/messages", headers=bob.auth).json()["messages"] == []
        finally:
            delivery_module.time.time = real  # type: ignore[assignment]


def test_at_rest_keys_rotate(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    key1, key2 = base64.b64encode(b"1" * 32).decode(), base64.b64encode(b"2" * 32).decode()
    with custom_client(backend, tmp_path, request, delivery={"at_rest_keys": {1: key1}}) as client:
        alice, bob = register(client, A), register(client, B)
        send(client, alice, bob, message(b"under key 1"))
    with custom_client(
        backend, tmp_path, request, truncate=False, delivery={"at_rest_keys": {1: key1, 2: key2}}
    ) as client:
        send(client, alice, bob, message(b"under key 2"))
        contents = [
            base64.b64decode(m["content"]) for m in client.get("/v1/messages", headers=bob.auth).json()["messages"]
        ]
        assert contents == [b"under key 1", b"under key 2"]
    with custom_client(backend, tmp_path, request, truncate=False, delivery={"at_rest_keys": {2: key2}}) as client:
        # key 1 is gone: its envelope cannot be opened and is dropped, never served garbled
        contents = [
            base64.b64decode(m["content"]) for m in client.get("/v1/messages", headers=bob.auth).json()["messages"]
        ]
        assert contents == [b"under key 2"]


def test_messages_rate_limits(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {
        "messages": {"capacity": 2, "permit_seconds": 60},
        "inboundMessageBytes": {"capacity": 10_000, "permit_seconds": 60},
    }
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        alice, bob, carol = register(client, A), register(client, B), register(client, C)
        assert send(client, alice, bob).status_code == 200
        assert send(client, alice, bob).status_code == 200
        limited = send(client, alice, bob)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert send(client, carol, bob).status_code == 200  # keyed by sender and destination
        big = message(b"y" * 9_000)
        assert send(client, carol, alice, big).status_code == 200
        assert send(client, bob, alice, big).status_code == 429  # inbound bytes per destination


def ssv2(
    recipients: list[tuple[TestAccount, list[tuple[int, int]]]], ciphertext: bytes = b"shared ciphertext"
) -> bytes:
    """A sealed-sender v2 payload (version 0x23) for registered accounts (§5.2 layout)."""
    out = bytearray([0x23, len(recipients)])
    for index, (account, devices) in enumerate(recipients):
        out += b"\x00" + uuid.UUID(account.aci).bytes
        for position, (device_id, registration_id) in enumerate(devices):
            more = 0x8000 if position < len(devices) - 1 else 0
            out += bytes([device_id]) + (more | registration_id).to_bytes(2, "big")
        out += bytes([index + 1]) * 32 + bytes([index + 101]) * 16  # c, at
    return bytes(out) + b"\xee" * 32 + ciphertext


def test_multi_recipient_stores_the_shared_payload_once(client: TestClient) -> None:
    alice, bob, carol = register(client, A), register(client, B), register(client, C)
    add_linked_device(client, carol.aci, 2)
    xor = bytes(x ^ y for x, y in zip(bob.uak, carol.uak, strict=True))
    payload = ssv2([(bob, [(1, 1234)]), (carol, [(1, 1234), (2, 77)])])
    headers = {
        "Content-Type": "application/vnd.signal-messenger.mrm",
        "Unidentified-Access-Key": base64.b64encode(xor).decode(),
    }
    response = client.put("/v1/messages/multi_recipient?ts=1234&online=false", content=payload, headers=headers)
    assert response.status_code == 200 and response.json() == {"uuids404": []}
    db = services(client).accounts.store.db

    async def rows() -> tuple[int, list[int]]:
        async with db.read() as conn:
            shared = await conn.scalar(sa.select(sa.func.count()).select_from(t.shared_payloads))
            parts = [len(r[0]) for r in await conn.execute(sa.select(t.messages.c.recipient_part))]
            return int(shared or 0), parts

    assert call(client, rows) == (1, [48, 48, 48])
    polled = client.get("/v1/messages", headers=carol.auth).json()["messages"]
    content = base64.b64decode(polled[0]["content"])
    assert polled[0]["type"] == 6 and polled[0]["sourceUuid"] is None and polled[0]["timestamp"] == 1234
    assert content == b"\x22" + bytes([2]) * 32 + bytes([102]) * 16 + b"\xee" * 32 + b"shared ciphertext"
    # wrong key, unknown recipient, device mismatches, malformed body, wrong type
    wrong = {**headers, "Unidentified-Access-Key": base64.b64encode(bob.uak).decode()}
    assert client.put("/v1/messages/multi_recipient", content=payload, headers=wrong).status_code == 401
    stranger = TestAccount("+1", "", str(uuid.uuid4()), "", alice.aci_identity, alice.pni_identity, bytes(16))
    unknown = ssv2([(bob, [(1, 1234)]), (stranger, [(1, 1)])])
    assert client.put("/v1/messages/multi_recipient", content=unknown, headers=headers).status_code == 404
    missing = ssv2([(bob, [(1, 1234)]), (carol, [(1, 1234)])])
    response = client.put("/v1/messages/multi_recipient", content=missing, headers=headers)
    assert response.status_code == 409
    assert response.json() == [{"uuid": carol.aci, "devices": {"missingDevices": [2], "extraDevices": []}}]
    stale = ssv2([(bob, [(1, 99)]), (carol, [(1, 1234), (2, 77)])])
    response = client.put("/v1/messages/multi_recipient", content=stale, headers=headers)
    assert response.status_code == 410 and response.json() == [{"uuid": bob.aci, "devices": {"staleDevices": [1]}}]
    assert client.put("/v1/messages/multi_recipient", content=b"\x23\x05", headers=headers).status_code == 400
    assert client.put("/v1/messages/multi_recipient", content=b"", headers=headers).status_code == 400
    plain = {**headers, "Content-Type": "application/octet-stream"}
    assert client.put("/v1/messages/multi_recipient", content=payload, headers=plain).status_code == 415
