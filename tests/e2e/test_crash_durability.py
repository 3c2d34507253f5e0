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
import time
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
MORE_NUMBERS = ("+15555550093", "+15555550094")


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
    numbers = ", ".join(f'"{n}" = "123456"' for n in (*NUMBERS, *MORE_NUMBERS))
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
    # Acknowledged (the socket closed right after its answers) and deleted: after another kill -9, a new
    # connection gets nothing more.
    wait_until_polled_empty(server, bob)
    server.kill9()
    server.start()
    assert asyncio.run(drain(server, bob)) == []


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


# -- concurrency, multi-recipient and receipts across kill -9 ------------------------------------------


def register_with_key(client: httpx.Client, number: str) -> dict[str, Any]:
    """Like :func:`register`, keeping the unidentified-access key for sealed sends."""
    session = client.post("/v1/verification/session", json={"number": number}).json()["id"]
    client.post(f"/v1/verification/session/{session}/code", json={"transport": "sms", "client": "t"})
    client.put(f"/v1/verification/session/{session}/code", json={"code": "123456"})
    password, uak = uuid.uuid4().hex, os.urandom(16)
    body = registration_body(session, Identity.generate(), Identity.generate(), uak)
    response = client.post("/v1/registration", json=body, headers=basic(number, password))
    assert response.status_code == 200, response.text
    return {"aci": response.json()["uuid"], "password": password, "uak": uak}


def auth(account: dict[str, Any]) -> dict[str, str]:
    return basic(f"{account['aci']}.1", account["password"])


async def drain(server: Server, account: dict[str, Any], ack: bool = True) -> list[Envelope]:
    """Connect, take every envelope up to the queue-empty signal (answering 200, or 500 if not ``ack``)."""
    received: list[Envelope] = []
    url = f"ws://127.0.0.1:{server.port}/v1/websocket/"
    async with websockets.connect(url, additional_headers=auth(account)) as ws, asyncio.timeout(20):
        while True:
            request = WebSocketMessage.FromString(await ws.recv()).request
            is_message = request.path == "/api/v1/message"
            if is_message:
                received.append(Envelope.FromString(request.body))
            status = 200 if ack or not is_message else 500
            reply = WebSocketMessage(type=WebSocketMessage.RESPONSE,
                                     response=WebSocketResponseMessage(id=request.id, status=status))
            await ws.send(reply.SerializeToString())
            if request.path == "/api/v1/queue/empty":
                return received


def wait_until_polled_empty(server: Server, account: dict[str, Any]) -> None:
    """The acknowledgements are committed: the queue, read over HTTP, is empty."""
    with httpx.Client(base_url=server.http, timeout=10) as client:
        for _ in range(100):
            if client.get("/v1/messages", headers=auth(account)).json()["messages"] == []:
                return
            time.sleep(0.05)
        left = client.get("/v1/messages", headers=auth(account)).json()["messages"]
    raise AssertionError(f"acknowledged messages are still queued: {len(left)}")


def test_kill_9_during_concurrent_sends_loses_no_acknowledged_message(server: Server) -> None:
    numbers = [*NUMBERS, *MORE_NUMBERS]
    with httpx.Client(base_url=server.http, timeout=10) as client:
        bob, *senders = (register_with_key(client, n) for n in numbers)
    acknowledged: dict[str, list[bytes]] = {s["aci"]: [] for s in senders}

    async def sender(http: httpx.AsyncClient, account: dict[str, Any], enough: asyncio.Event,
                     stop: asyncio.Event) -> None:
        for i in range(10_000):
            content = f"{account['aci']} {i}".encode()
            body = {"messages": [{"type": 1, "destinationDeviceId": 1, "destinationRegistrationId": 1234,
                                  "content": base64.b64encode(content).decode()}], "timestamp": i + 1}
            try:
                response = await http.put(f"/v1/messages/{bob['aci']}", json=body, headers=auth(account))
            except httpx.HTTPError:
                return  # the server died under this request: it may or may not have been stored
            assert response.status_code == 200, response.text
            acknowledged[account["aci"]].append(content)
            if sum(map(len, acknowledged.values())) >= 60:
                enough.set()
            if stop.is_set():
                return

    async def run() -> None:
        enough, stop = asyncio.Event(), asyncio.Event()
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
            tasks = [asyncio.create_task(sender(http, s, enough, stop)) for s in senders]
            async with asyncio.timeout(20):
                await enough.wait()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(run())
    server.proc.wait(timeout=10)  # type: ignore[union-attr]
    server.start()
    received = asyncio.run(drain(server, bob))
    by_sender: dict[str, list[bytes]] = {s["aci"]: [] for s in senders}
    for envelope in received:
        by_sender[envelope.source_service_id_string].append(envelope.content)
    for aci, contents in acknowledged.items():
        got = by_sender[aci]
        assert got[: len(contents)] == contents  # every acknowledged one, in order
        assert len(got) <= len(contents) + 1  # at most the one whose answer the kill cut off
    assert len({e.server_guid for e in received}) == len(received)


def test_multi_recipient_sends_and_receipts_survive_kill_9(server: Server) -> None:
    with httpx.Client(base_url=server.http, timeout=10) as client:
        alice, bob, carol = (register_with_key(client, n) for n in (*NUMBERS, MORE_NUMBERS[0]))
        for i in range(3):
            send(client, alice, bob, f"identified {i}".encode())
        xor = bytes(a ^ b for a, b in zip(bob["uak"], carol["uak"], strict=True))
        payload = bytearray([0x22, 2])
        for index, account in enumerate((bob, carol)):
            payload += uuid.UUID(account["aci"]).bytes + bytes([1]) + (1234).to_bytes(2, "big")
            payload += bytes([index + 1]) * 48  # c ‖ at
        payload += bytes(range(32)) + b"one shared ciphertext"
        response = client.put("/v1/messages/multi_recipient?ts=77", content=bytes(payload), headers={
            "Content-Type": "application/vnd.signal-messenger.mrm",
            "Unidentified-Access-Key": base64.b64encode(xor).decode(),
        })
        assert response.status_code == 200, response.text
    server.kill9()
    server.start()
    for index, account in enumerate((bob, carol)):
        received = asyncio.run(drain(server, account))
        shared = b"\x22" + bytes([index + 1]) * 48 + bytes(range(32)) + b"one shared ciphertext"
        expected = [f"identified {i}".encode() for i in range(3)] if account is bob else []
        assert [e.content for e in received] == [*expected, shared]
        assert received[-1].type == 6 and received[-1].client_timestamp == 77
        wait_until_polled_empty(server, account)
    server.kill9()
    server.start()
    receipts = asyncio.run(drain(server, alice))
    assert [(e.type, e.source_service_id_string, e.client_timestamp) for e in receipts] == [
        (5, bob["aci"], 1)
    ] * 3  # one per identified message, none for the sealed multi-recipient one
