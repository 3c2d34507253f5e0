"""A message acknowledged to its sender survives ``kill -9`` of the server and stays queued until the
recipient acknowledges it (real processes, SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketResponseMessage
from tests.conftest import PG_URL
from tests.helpers import Identity, basic, registration_body

NUMBERS = ("+15555550091", "+15555550092")


class Server:
    def __init__(self, config: Path, cwd: Path) -> None:
        self.config, self.cwd = config, cwd
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mailslot", "serve", "--config", str(self.config)],
                                     cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=env)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.port = json.loads(line[6:])["port"]
                return
        raise AssertionError("server did not start")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    numbers = ", ".join(f'"{n}" = "123456"' for n in NUMBERS)
    storage = f'url = "sqlite:///{tmp_path}/db.sqlite"\n'
    if backend == "postgres":
        from tests.conftest import _truncate_all

        schema = request.getfixturevalue("pg_schema")
        _truncate_all(schema)
        storage = f'url = "{PG_URL}"\nschema = "{schema}"\n'
    config = tmp_path / "mailslot.toml"
    config.write_text(
        f'[server]\nport = 0\n[storage]\n{storage}data_dir = "{tmp_path}/data"\n'
        f"[registration]\ntest_numbers = {{ {numbers} }}\n"
        '[rate_limits]\nmessages = { capacity = 100000, permit_seconds = 0.0001 }\n'
    )
    instance = Server(config, tmp_path)
    instance.start()
    yield instance
    instance.stop()


def register(client: httpx.Client, number: str) -> dict[str, Any]:
    session = client.post("/v1/verification/session", json={"number": number}).json()["id"]
    client.post(f"/v1/verification/session/{session}/code", json={"transport": "sms", "client": "t"})
    client.put(f"/v1/verification/session/{session}/code", json={"code": "123456"})
    password = uuid.uuid4().hex
    body = registration_body(session, Identity.generate(), Identity.generate(), os.urandom(16))
    response = client.post("/v1/registration", json=body, headers=basic(number, password))
    assert response.status_code == 200, response.text
    return {"aci": response.json()["uuid"], "password": password}


def send(client: httpx.Client, sender: dict[str, Any], receiver: dict[str, Any], content: bytes) -> None:
    body = {"messages": [{"type": 1, "destinationDeviceId": 1, "destinationRegistrationId": 1234,
                          "content": base64.b64encode(content).decode()}], "timestamp": 1}
    response = client.put(f"/v1/messages/{receiver['aci']}", json=body,
                          headers=basic(f"{sender['aci']}.1", sender["password"]))
    assert response.status_code == 200, response.text


async def receive(server: Server, account: dict[str, Any], count: int, ack: bool) -> list[Envelope]:
    """Connect the device's socket, take ``count`` envelopes (acknowledging them or not)."""
    headers = basic(f"{account['aci']}.1", account["password"])
    received: list[Envelope] = []
    async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/websocket/", additional_headers=headers) as ws:
        async with asyncio.timeout(20):
            while len(received) < count:
                frame = WebSocketMessage.FromString(await ws.recv())
                request = frame.request
                if request.path == "/api/v1/message":
                    envelope = Envelope.FromString(request.body)
                    if envelope.type == 1:
                        received.append(envelope)
                    elif not ack:
                        continue
                status = 200 if ack or request.path != "/api/v1/message" else 500
                reply = WebSocketMessage(type=WebSocketMessage.RESPONSE,
                                         response=WebSocketResponseMessage(id=request.id, status=status))
                await ws.send(reply.SerializeToString())
            if ack:
                await asyncio.sleep(0.5)  # let the acknowledgements commit before the socket goes
    return received


def test_acknowledged_sends_survive_kill_9(server: Server) -> None:
    with httpx.Client(base_url=server.http, timeout=10) as client:
        alice, bob = register(client, NUMBERS[0]), register(client, NUMBERS[1])
        contents = [f"message {i}".encode() for i in range(40)]
        for content in contents:
            send(client, alice, bob, content)
    server.kill9()
    server.start()
    received = asyncio.run(receive(server, bob, len(contents), ack=True))
    assert [e.content for e in received] == contents  # every one, in order
    assert len({e.server_guid for e in received}) == len(contents)
    # Acknowledged and deleted: a new connection gets nothing more.
    server.kill9()
    server.start()
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(receive(server, bob, 1, ack=True), 2))


def test_unacknowledged_envelopes_come_back_with_the_same_guids_after_kill_9(server: Server) -> None:
    with httpx.Client(base_url=server.http, timeout=10) as client:
        alice, bob = register(client, NUMBERS[0]), register(client, NUMBERS[1])
        for i in range(5):
            send(client, alice, bob, f"hello {i}".encode())
    first = asyncio.run(receive(server, bob, 5, ack=False))
    server.kill9()
    server.start()
    second = asyncio.run(receive(server, bob, 5, ack=True))
    assert [e.server_guid for e in second] == [e.server_guid for e in first]
    assert [e.content for e in second] == [f"hello {i}".encode() for i in range(5)]
