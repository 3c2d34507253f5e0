"""Sending, queueing and delivering messages (digest §5, §6.4) on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from mailslot.backends.sql import tables as t
from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage
from tests.api.delivery_support import Device, access_key, message, pending, receive_frame, send
from tests.api.foundation_support import add_linked_device, call, custom_client, services
from tests.helpers import TestAccount, b64, register

A, B, C = "+15555550071", "+15555550072", "+15555550073"


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


# -- more of §5.1 and §5.4 -------------------------------------------------------------------------


def test_content_size_limit_is_96_kib_for_every_kind_of_send(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    limit = 96 * 1024
    assert send(client, alice, bob, message(b"x" * limit)).status_code == 200
    assert send(client, alice, bob, message(b"x" * (limit + 1))).status_code == 413
    sealed = access_key(bob.uak)
    assert send(client, None, bob, message(b"x" * (limit + 1), kind=6), headers=sealed).status_code == 413
    assert send(client, alice, bob, message(b"")).status_code == 422  # content needs a byte
    (entity,) = client.get("/v1/messages", headers=bob.auth).json()["messages"]
    assert len(base64.b64decode(entity["content"])) == limit


def test_sync_from_a_linked_device_names_every_other_device(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    linked = add_linked_device(client, alice.aci, 2)
    add_linked_device(client, alice.aci, 3)
    # From device 2: devices 1 and 3, never 2 itself.
    body = {"messages": [message(b"sync", 1, 1234), message(b"sync", 2, 77)], "timestamp": 5}
    response = client.put(f"/v1/messages/{alice.aci}", json=body, headers=linked)
    assert response.status_code == 409 and response.json() == {"missingDevices": [3], "extraDevices": [2]}
    body = {"messages": [message(b"sync", 1, 1234), message(b"sync", 3, 77)], "timestamp": 5}
    response = client.put(f"/v1/messages/{alice.aci}", json=body, headers=linked)
    assert response.status_code == 200 and response.json() == {"needsSync": False}
    (entity,) = client.get("/v1/messages", headers=alice.auth).json()["messages"]
    assert (entity["sourceUuid"], entity["sourceDevice"], entity["destinationUuid"]) == (alice.aci, 2, alice.aci)
    assert pending(client, alice.aci, 2) == 0 and pending(client, alice.aci, 3) == 1
    # An ordinary send from a linked device also asks for a sync.
    assert client.put(f"/v1/messages/{bob.aci}", json={"messages": [message()]}, headers=linked).json() == {
        "needsSync": True
    }


def test_urgent_defaults_to_true_and_timestamp_zero_means_server_time(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    before = int(time.time() * 1000)
    body = {"messages": [message(b"default")], "timestamp": 0}
    assert client.put(f"/v1/messages/{bob.aci}", json=body, headers=alice.auth).status_code == 200
    after = int(time.time() * 1000)
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as ws:
        device = Device(ws)
        envelope = device.envelopes(1)[0]
    assert envelope.HasField("urgent") and envelope.urgent is True
    assert before <= envelope.client_timestamp <= after and before <= envelope.server_timestamp <= after
    body = {"messages": [message()], "timestamp": 8_640_000_000_000_001}
    assert client.put(f"/v1/messages/{bob.aci}", json=body, headers=alice.auth).status_code in (400, 422)


def test_sealed_sender_access_rules(client: TestClient, pair: tuple[TestAccount, TestAccount]) -> None:
    alice, bob = pair
    open_to_all = register(client, C, accountAttributes={"unrestrictedUnidentifiedAccess": True})
    any_key = access_key(bytes(range(16)))
    assert send(client, None, open_to_all, message(kind=6), headers=any_key).status_code == 200
    assert send(client, None, open_to_all, message(kind=6)).status_code == 401  # still needs a key
    malformed = {"Unidentified-Access-Key": "not base64!"}
    assert send(client, None, open_to_all, message(kind=6), headers=malformed).status_code == 401
    # Sealed sender never addresses a PNI, whatever the key.
    body = {"messages": [message(kind=6, registration=4321)]}
    headers = access_key(bob.uak)
    assert client.put(f"/v1/messages/PNI:{bob.pni}", json=body, headers=headers).status_code == 401
    token = {"Group-Send-Token": base64.b64encode(b"token").decode()}
    assert send(client, None, bob, message(kind=6), headers={**headers, **token}).status_code == 400
    assert send(client, alice, bob, message(), headers=token).status_code == 400
    assert pending(client, bob.aci) == 0 and pending(client, open_to_all.aci) == 1


def test_sends_over_the_socket_are_delivered_like_http_sends(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    with client.websocket_connect("/v1/websocket/", headers=bob.auth) as receiver, \
            client.websocket_connect("/v1/websocket/") as anonymous:
        device = Device(receiver)
        device.expect_queue_empty()
        body = json.dumps({"messages": [message(b"sealed over the socket", kind=6)], "timestamp": 31}).encode()
        request = WebSocketRequestMessage(
            verb="PUT", path=f"/v1/messages/{bob.aci}", id=7, body=body,
            headers=["content-type:application/json", f"unidentified-access-key:{b64(bob.uak)}"],
        )
        anonymous.send_bytes(WebSocketMessage(type=WebSocketMessage.REQUEST, request=request).SerializeToString())
        answer = receive_frame(anonymous)
        assert answer.response.id == 7 and answer.response.status == 200
        assert json.loads(answer.response.body) == {"needsSync": False}
        envelope = device.envelopes(1)[0]
        assert envelope.content == b"sealed over the socket" and envelope.type == 6
        assert envelope.client_timestamp == 31 and not envelope.HasField("source_service_id")
        request.id, request.headers[:] = 8, ["content-type:application/json"]  # no key: refused
        anonymous.send_bytes(WebSocketMessage(type=WebSocketMessage.REQUEST, request=request).SerializeToString())
        assert receive_frame(anonymous).response.status == 401
        device.assert_silent()


def test_inbound_bytes_limit_and_retry_after(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    limits = {
        "messages": {"capacity": 1, "permit_seconds": 30},
        "inboundMessageBytes": {"capacity": 1_000, "permit_seconds": 60},
    }
    with custom_client(backend, tmp_path, request, rate_limits=limits) as client:
        alice, bob = register(client, A), register(client, B)
        assert send(client, alice, bob, message(b"x" * 600)).status_code == 200
        limited = send(client, alice, bob, message(b"y"))
        assert limited.status_code == 429 and 0 < int(limited.headers["retry-after"]) <= 30
        # Sealed sends are not under the per-pair limit, but they do count against the destination's bytes.
        sealed = access_key(bob.uak)
        assert send(client, None, bob, message(b"z" * 300, kind=6), headers=sealed).status_code == 200
        limited = send(client, None, bob, message(b"w" * 200, kind=6), headers=sealed)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        assert pending(client, bob.aci) == 2  # nothing queued by a limited request


def test_polling_shape_paging_and_deleting_only_ones_own(
    client: TestClient, pair: tuple[TestAccount, TestAccount]
) -> None:
    alice, bob = pair
    carol = register(client, C)
    assert client.get("/v1/messages").status_code == 401
    sealed = access_key(bob.uak)
    for i in range(101):
        assert send(client, None, bob, message(f"{i}".encode(), kind=6), headers=sealed).status_code == 200
    send(client, alice, bob, message(b"identified"), timestamp=4242)
    started = time.monotonic()
    page = client.get("/v1/messages?timeout=0", headers=bob.auth).json()
    assert time.monotonic() - started < 1.0
    assert page["more"] is True and len(page["messages"]) == 100
    assert [base64.b64decode(m["content"]) for m in page["messages"]] == [f"{i}".encode() for i in range(100)]
    for entity in page["messages"]:
        assert client.delete(f"/v1/messages/uuid/{entity['guid']}", headers=bob.auth).status_code == 204
    page = client.get("/v1/messages", headers=bob.auth).json()
    assert page["more"] is False and len(page["messages"]) == 2
    identified = page["messages"][1]
    assert set(identified) == {
        "guid", "type", "timestamp", "sourceUuid", "sourceDevice", "destinationUuid", "updatedPni", "content",
        "serverTimestamp", "urgent", "story", "reportSpamToken",
    }
    assert uuid.UUID(identified["guid"]) and identified["type"] == 1 and identified["timestamp"] == 4242
    assert (identified["sourceUuid"], identified["sourceDevice"], identified["destinationUuid"]) == (
        alice.aci, 1, bob.aci
    )
    assert identified["urgent"] is True and identified["story"] is False and identified["updatedPni"] is None
    assert isinstance(identified["serverTimestamp"], int) and identified["serverTimestamp"] > 0
    assert page["messages"][0]["sourceUuid"] is None and page["messages"][0]["sourceDevice"] is None
    # Another account cannot acknowledge Bob's message: 204 (no oracle), but it stays.
    assert client.delete(f"/v1/messages/uuid/{identified['guid']}", headers=carol.auth).status_code == 204
    assert client.delete(f"/v1/messages/uuid/{uuid.uuid4()}", headers=bob.auth).status_code == 204
    assert pending(client, bob.aci) == 2
    assert client.get("/v1/messages?timeout=-1", headers=bob.auth).status_code == 422
