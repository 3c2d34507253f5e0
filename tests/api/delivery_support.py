"""Helpers for the delivery tests: message bodies, a receiving device over the test socket, waiting."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession

from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import (
    WebSocketMessage,
    WebSocketRequestMessage,
    WebSocketResponseMessage,
)
from tests.api.foundation_support import call, services
from tests.helpers import TestAccount, b64

T = TypeVar("T")

MESSAGE_PATH = "/api/v1/message"
QUEUE_EMPTY_PATH = "/api/v1/queue/empty"
RECEIVE_TIMEOUT = 5.0


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
    to: TestAccount | str,
    *messages: dict[str, Any],
    headers: dict[str, str] | None = None,
    timestamp: int = 1000,
    **extra: Any,
) -> Any:
    """``PUT /v1/messages/{to}``: identified with ``sender``'s Basic auth, else sealed (``headers``)."""
    destination = to if isinstance(to, str) else to.aci
    body = {"messages": list(messages) or [message()], "timestamp": timestamp, **extra}
    auth = sender.auth if sender else {}
    return client.put(f"/v1/messages/{destination}", json=body, headers={**auth, **(headers or {})})


def access_key(key: bytes) -> dict[str, str]:
    return {"Unidentified-Access-Key": base64.b64encode(key).decode()}


def pending(client: TestClient, aci: str, device_id: int = 1) -> int:
    """Rows in the device's queue, expired or not."""
    return call(client, services(client).delivery.pending_count, uuid.UUID(aci), device_id)


def wait_until(probe: Callable[[], T], expected: T, timeout: float = 5.0) -> T:
    """Poll ``probe`` until it returns ``expected``; returns the last value (for the assertion)."""
    deadline = time.monotonic() + timeout
    value = probe()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        value = probe()
    return value


def receive_frame(ws: WebSocketTestSession, timeout: float = RECEIVE_TIMEOUT) -> WebSocketMessage:
    """The next frame from the server, or TimeoutError (the test client's own receive waits forever)."""

    async def get() -> Any:
        with anyio.fail_after(timeout):
            return await ws._send_rx.receive()

    raw = ws.portal.call(get)
    ws._raise_on_close(raw)
    return WebSocketMessage.FromString(raw["bytes"])


class Device:
    """A receiving socket: reads the server's requests and answers them like a client."""

    def __init__(self, ws: WebSocketTestSession) -> None:
        self.ws = ws
        self.queue_empties = 0
        self.responses: list[WebSocketResponseMessage] = []
        self._next_id = 1

    def next_request(self, timeout: float = RECEIVE_TIMEOUT) -> WebSocketRequestMessage:
        while True:
            frame = receive_frame(self.ws, timeout)
            if frame.type == WebSocketMessage.REQUEST:
                if frame.request.path == QUEUE_EMPTY_PATH:
                    self.queue_empties += 1
                return frame.request
            self.responses.append(frame.response)

    def answer(self, request: WebSocketRequestMessage, status: int = 200) -> None:
        reply = WebSocketMessage(
            type=WebSocketMessage.RESPONSE, response=WebSocketResponseMessage(id=request.id, status=status)
        )
        self.ws.send_bytes(reply.SerializeToString())

    def deliveries(self, count: int) -> list[WebSocketRequestMessage]:
        """The next ``count`` message deliveries, unanswered; a queue-empty signal is answered and counted."""
        out: list[WebSocketRequestMessage] = []
        while len(out) < count:
            request = self.next_request()
            if request.path == MESSAGE_PATH:
                out.append(request)
            else:
                assert request.path == QUEUE_EMPTY_PATH, request.path
                self.answer(request)
        return out

    def envelopes(self, count: int, status: int = 200) -> list[Envelope]:
        """The next ``count`` envelopes, each answered with ``status``."""
        out = []
        while len(out) < count:
            (request,) = self.deliveries(1)
            self.answer(request, status)
            out.append(Envelope.FromString(request.body))
        return out

    def expect_queue_empty(self) -> None:
        request = self.next_request()
        assert request.path == QUEUE_EMPTY_PATH, f"expected queue/empty, got {request.path}"
        assert request.verb == "PUT" and not request.body
        self.answer(request)

    def keepalive(self) -> int:
        """A tunnelled ``GET /v1/keepalive``; returns its status (pushes seen meanwhile are left unanswered)."""
        request_id = 10_000 + self._next_id
        self._next_id += 1
        frame = WebSocketMessage(
            type=WebSocketMessage.REQUEST,
            request=WebSocketRequestMessage(verb="GET", path="/v1/keepalive", id=request_id),
        )
        self.ws.send_bytes(frame.SerializeToString())
        while True:
            reply = receive_frame(self.ws)
            if reply.type == WebSocketMessage.RESPONSE and reply.response.id == request_id:
                return reply.response.status
            raise AssertionError(f"unexpected frame before the keepalive answer: {reply}")

    def assert_silent(self, seconds: float = 0.3) -> None:
        """Nothing arrives within ``seconds``."""
        try:
            frame = receive_frame(self.ws, seconds)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame}")
