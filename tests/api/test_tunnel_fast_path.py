"""PUT /v1/messages/{destination} over the socket takes a fast path; it must answer exactly as the route."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage
from tests.helpers import TestAccount, b64, register


class Tunnel:
    def __init__(self, ws: WebSocketTestSession) -> None:
        self.ws = ws
        self.next_id = 1

    def request(
        self, verb: str, path: str, body: Any = None, headers: list[str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = WebSocketRequestMessage(
            verb=verb, path=path, id=self.next_id, headers=["content-type:application/json", *(headers or [])], body=raw
        )
        self.next_id += 1
        self.ws.send_bytes(WebSocketMessage(type=WebSocketMessage.REQUEST, request=request).SerializeToString())
        while True:
            message = WebSocketMessage.FromString(self.ws.receive_bytes())
            if message.type == WebSocketMessage.RESPONSE and message.response.id == request.id:
                response = message.response
                names = {h.split(":", 1)[0].lower(): h.split(":", 1)[1] for h in response.headers}
                return response.status, json.loads(response.body) if response.body else None, names


def message(content: bytes = b"hi", device: int = 1, registration: int = 1234, kind: int = 1) -> dict[str, Any]:
    return {
        "type": kind,
        "destinationDeviceId": device,
        "destinationRegistrationId": registration,
        "content": b64(content),
    }


def cases(bob: TestAccount) -> list[tuple[str, Any, list[str]]]:
    return [
        ("ok", {"messages": [message()], "timestamp": 5}, []),
        ("missing devices", {"messages": [message(device=2)]}, []),
        ("stale", {"messages": [message(registration=99)]}, []),
        ("too large", {"messages": [message(content=b"x" * (96 * 1024 + 1))]}, []),
        ("bad type", {"messages": [message(kind=5)]}, []),
        ("bad base64", {"messages": [{**message(), "content": "%%%"}]}, []),
        ("not json", b"{nope", []),
        ("no messages", {"messages": []}, []),
        ("no body", b"", []),
    ]


@pytest.mark.parametrize("case", range(9))
def test_fast_path_answers_like_the_route(client: TestClient, case: int) -> None:
    alice = register(client, "+15555550051")
    bob = register(client, "+15555550052")
    name, body, headers = cases(bob)[case]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    http = client.put(
        f"/v1/messages/{bob.aci}", content=raw, headers={**alice.auth, "content-type": "application/json"}
    )
    with client.websocket_connect("/v1/websocket/", headers={**alice.auth, "X-Signal-Disable-Messages": "true"}) as ws:
        status, answer, response_headers = Tunnel(ws).request("PUT", f"/v1/messages/{bob.aci}", body, headers)
    assert status == http.status_code, name
    assert answer == http.json(), name
    assert response_headers.get("content-type") == "application/json"
    if status == 200:
        assert answer == {"needsSync": False}


def test_fast_path_sealed_sender_and_rate_limit(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> None:
    from tests.api.foundation_support import custom_client

    with custom_client(
        backend, tmp_path, request, rate_limits={"inboundMessageBytes": {"capacity": 3, "permit_seconds": 60}}
    ) as client:
        bob = register(client, "+15555550053")
        with client.websocket_connect("/v1/websocket/") as ws:
            tunnel = Tunnel(ws)
            body = {"messages": [message(kind=6)]}
            key = base64.b64encode(bob.uak).decode()
            assert tunnel.request("PUT", f"/v1/messages/{bob.aci}", body)[0] == 401
            wrong = base64.b64encode(bytes(16)).decode()
            assert (
                tunnel.request("PUT", f"/v1/messages/{bob.aci}", body, [f"unidentified-access-key:{wrong}"])[0] == 401
            )
            status, answer, _ = tunnel.request(
                "PUT", f"/v1/messages/{bob.aci}", body, [f"unidentified-access-key:{key}"]
            )
            assert (status, answer) == (200, {"needsSync": False})
            status, answer, headers = tunnel.request(
                "PUT", f"/v1/messages/{bob.aci}", body, [f"unidentified-access-key:{key}"]
            )
            assert status == 429 and answer["code"] == "rate_limited" and int(headers["retry-after"]) > 0
