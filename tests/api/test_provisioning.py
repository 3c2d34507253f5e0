"""The provisioning socket and ``PUT /v1/provisioning/{address}`` (digest §3.2; issue 5) on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

import mailslot.transport.provisioning as provisioning
from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage, WebSocketResponseMessage
from tests.api.delivery_support import receive_frame
from tests.helpers import TestAccount, b64, register

PATH = "/v1/websocket/provisioning/"
MAX_BYTES = 256 * 1024
PRIMARY = "+15555550081"


@pytest.fixture
def primary(client: TestClient) -> TestAccount:
    return register(client, PRIMARY)


def answer(ws: WebSocketTestSession, request: WebSocketRequestMessage, status: int = 200) -> None:
    reply = WebSocketMessage(
        type=WebSocketMessage.RESPONSE, response=WebSocketResponseMessage(id=request.id, status=status)
    )
    ws.send_bytes(reply.SerializeToString())


def next_request(ws: WebSocketTestSession, timeout: float = 5.0) -> WebSocketRequestMessage:
    frame = receive_frame(ws, timeout)
    assert frame.type == WebSocketMessage.REQUEST, frame
    return frame.request


def read_address(ws: WebSocketTestSession, respond: bool = True) -> str:
    """The first frame: ``PUT /v1/address`` carrying a ``ProvisioningAddress`` (field 1, string)."""
    request = next_request(ws)
    assert (request.verb, request.path) == ("PUT", "/v1/address")
    body = request.body
    assert body[0] == 0x0A, "field 1, length-delimited"
    assert body[1] == len(body) - 2, "the address is the only field"
    if respond:
        answer(ws, request)
    return body[2:].decode()


def closed_with(ws: WebSocketTestSession, timeout: float = 5.0) -> WebSocketDisconnect:
    """Read (and answer) frames until the server closes the socket; fails if it stays open."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the socket did not close"
        try:
            frame = receive_frame(ws, remaining)
        except WebSocketDisconnect as closed:
            return closed
        except TimeoutError:
            raise AssertionError("the socket did not close") from None
        if frame.type == WebSocketMessage.REQUEST:
            answer(ws, frame.request)


def put_provisioning(client: TestClient, account: TestAccount | None, address: str, body: Any) -> Any:
    headers = account.auth if account is not None else {}
    return client.put(f"/v1/provisioning/{address}", json=body, headers=headers)


def test_socket_announces_an_unguessable_address_at_once(client: TestClient) -> None:
    addresses = []
    for _ in range(3):
        with client.websocket_connect(PATH) as ws:
            address = read_address(ws)
        assert len(address) == 24
        assert all(c.isalnum() or c in "-_=" for c in address), "URL-safe base64"
        assert len(base64.urlsafe_b64decode(address)) == 16
        addresses.append(address)
    assert len(set(addresses)) == 3, "every socket gets its own address"


def test_primary_message_is_delivered_as_put_message_then_socket_closes(
    client: TestClient, primary: TestAccount
) -> None:
    envelope = b"\x0a\x21" + secrets.token_bytes(33) + b"\x12\x40" + secrets.token_bytes(64)
    with client.websocket_connect(PATH) as ws, ThreadPoolExecutor(1) as pool:
        address = read_address(ws)
        # MIME base64, as clients send it (line breaks allowed).
        body = {"body": base64.encodebytes(envelope).decode()}
        pending = pool.submit(put_provisioning, client, primary, address, body)
        request = next_request(ws)
        assert (request.verb, request.path) == ("PUT", "/v1/message")
        assert request.body == envelope, "the raw ProvisionEnvelope bytes"
        answer(ws, request)
        assert pending.result(timeout=10).status_code == 204
        closed = closed_with(ws)
        assert closed.code == 1000
    # Delivered once: the address is gone with its socket.
    assert put_provisioning(client, primary, address, {"body": b64(envelope)}).status_code == 404


def test_nobody_listening_is_404(client: TestClient, primary: TestAccount) -> None:
    unknown = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()
    response = put_provisioning(client, primary, unknown, {"body": b64(b"envelope")})
    assert response.status_code == 404, response.text
    # A socket that has gone away listens no more.
    with client.websocket_connect(PATH) as ws:
        address = read_address(ws)
    assert put_provisioning(client, primary, address, {"body": b64(b"envelope")}).status_code == 404


def test_sending_needs_an_authenticated_device(client: TestClient, primary: TestAccount) -> None:
    with client.websocket_connect(PATH) as ws:
        address = read_address(ws)
        assert put_provisioning(client, None, address, {"body": b64(b"envelope")}).status_code == 401
        wrong = {"Authorization": "Basic " + b64(f"{primary.aci}.1:wrong".encode())}
        response = client.put(f"/v1/provisioning/{address}", json={"body": b64(b"x")}, headers=wrong)
        assert response.status_code == 401


def test_oversized_and_malformed_bodies_are_refused_and_the_socket_stays(
    client: TestClient, primary: TestAccount
) -> None:
    with client.websocket_connect(PATH) as ws, ThreadPoolExecutor(1) as pool:
        address = read_address(ws)
        too_large = put_provisioning(client, primary, address, {"body": b64(b"\x01" * (MAX_BYTES + 1))})
        assert too_large.status_code == 400, too_large.text
        bad = put_provisioning(client, primary, address, {"body": "not*base64!"})
        assert bad.status_code == 422, bad.text
        assert put_provisioning(client, primary, address, {}).status_code == 422
        # Exactly 256 KiB is allowed, and still reaches the socket that the refusals left open.
        largest = secrets.token_bytes(MAX_BYTES)
        pending = pool.submit(put_provisioning, client, primary, address, {"body": b64(largest)})
        request = next_request(ws)
        assert request.path == "/v1/message" and request.body == largest
        answer(ws, request)
        assert pending.result(timeout=10).status_code == 204


@pytest.mark.parametrize("answer_address", [True, False], ids=["answered", "unanswered"])
def test_socket_closes_after_its_lifetime(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, answer_address: bool
) -> None:
    """Closed after the lifetime regardless, even if the client never answers the address request."""
    monkeypatch.setattr(provisioning, "LIFETIME_SECONDS", 0.5)
    with client.websocket_connect(PATH) as ws:
        started = time.monotonic()
        read_address(ws, respond=answer_address)
        closed = closed_with(ws, timeout=5.0)
        assert (closed.code, closed.reason) == (1000, "Timeout")
        assert time.monotonic() - started < 4.0


def test_keepalive_over_the_provisioning_socket(client: TestClient) -> None:
    with client.websocket_connect(PATH) as ws:
        read_address(ws)
        for request_id, path in enumerate(["/v1/keepalive/provisioning", "/v1/keepalive"], start=1):
            request = WebSocketRequestMessage(verb="GET", path=path, id=request_id)
            ws.send_bytes(WebSocketMessage(type=WebSocketMessage.REQUEST, request=request).SerializeToString())
            frame = receive_frame(ws)
            assert frame.type == WebSocketMessage.RESPONSE
            assert (frame.response.id, frame.response.status) == (request_id, 200), json.dumps(path)
