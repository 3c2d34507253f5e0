"""A tunnelled request is authorised by the socket's credential as it stands now, not at the upgrade."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage
from tests.helpers import TestAccount, register


def tunnel(
    ws: WebSocketTestSession, verb: str, path: str, request_id: int, body: bytes | None = None
) -> tuple[int, dict]:
    request = WebSocketRequestMessage(verb=verb, path=path, id=request_id, headers=["content-type:application/json"])
    if body is not None:
        request.body = body
    ws.send_bytes(WebSocketMessage(type=WebSocketMessage.REQUEST, request=request).SerializeToString())
    while True:
        message = WebSocketMessage()
        message.ParseFromString(ws.receive_bytes())
        if message.type == WebSocketMessage.RESPONSE and message.response.id == request_id:
            body_bytes = message.response.body
            return message.response.status, (json.loads(body_bytes) if body_bytes else {})


def closed_with(ws: WebSocketTestSession) -> int:
    with pytest.raises(WebSocketDisconnect) as closed:
        while True:
            ws.receive_bytes()
    return closed.value.code


def test_deleted_account_loses_its_open_socket(client: TestClient) -> None:
    account = register(client, "+15555550031")
    with client.websocket_connect("/v1/websocket/", headers=account.auth) as ws:
        status, body = tunnel(ws, "GET", "/v1/accounts/whoami", 1)
        assert status == 200 and body["uuid"] == account.aci
        assert client.delete("/v1/accounts/me", headers=account.auth).status_code == 204
        assert closed_with(ws) == 4401


def test_reregistration_closes_the_old_socket(client: TestClient) -> None:
    first: TestAccount = register(client, "+15555550032")
    with client.websocket_connect("/v1/websocket/", headers=first.auth) as ws:
        assert tunnel(ws, "GET", "/v1/accounts/whoami", 1)[0] == 200
        second = register(client, "+15555550032")
        assert second.aci == first.aci
        assert closed_with(ws) == 4401


def test_socket_that_receives_no_messages_is_still_refused_after_deletion(client: TestClient) -> None:
    """A socket opened with X-Signal-Disable-Messages holds no presence, so nothing closes it; its
    requests must still stop being authorised once the credential is gone."""
    account = register(client, "+15555550034")
    headers = {**account.auth, "X-Signal-Disable-Messages": "true"}
    with client.websocket_connect("/v1/websocket/", headers=headers) as ws:
        assert tunnel(ws, "GET", "/v1/accounts/whoami", 1)[0] == 200
        assert client.delete("/v1/accounts/me", headers=account.auth).status_code == 204
        assert tunnel(ws, "GET", "/v1/accounts/whoami", 2)[0] == 401


def test_socket_sees_attribute_changes_made_elsewhere(client: TestClient) -> None:
    account = register(client, "+15555550033")
    with client.websocket_connect("/v1/websocket/", headers=account.auth) as ws:
        assert tunnel(ws, "GET", "/v1/accounts/whoami", 1)[1]["storageCapable"] is True
        attributes = {"fetchesMessages": True, "registrationId": 1234, "pniRegistrationId": 4321,
                      "capabilities": {"spqr": True}, "unidentifiedAccessKey": "AAAAAAAAAAAAAAAAAAAAAA=="}
        assert client.put("/v1/accounts/attributes/", json=attributes, headers=account.auth).status_code == 204
        assert tunnel(ws, "GET", "/v1/accounts/whoami", 2)[1]["storageCapable"] is False
