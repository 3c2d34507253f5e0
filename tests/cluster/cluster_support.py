"""Real `mailslot serve` processes in cluster mode: N nodes on one PostgreSQL database and one Redis.

Every cluster gets a fresh PostgreSQL schema in a database of its own (``mailslot_cluster_test``, created
on first use) and a unique Redis ``key_prefix``; both are removed when it stops. The nodes share one
``data_dir`` (the generated JWT, link, at-rest and sealed-sender secrets live there): node 1 starts
first and generates them, the others start together after its READY line.

Clients: :func:`register` (the whole HTTP flow, on any node) and :class:`Socket`, a device's
authenticated WebSocket on a chosen node that answers the server's requests as a client does and
collects the envelopes it gets (acknowledging them or not) and the close code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage, WebSocketResponseMessage
from tests.conftest import PG_URL
from tests.helpers import TestAccount, b64
from tests.helpers import register as register_with

REDIS_URL = os.environ.get("MAILSLOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CLUSTER_DATABASE = os.environ.get("MAILSLOT_TEST_CLUSTER_DB", "mailslot_cluster_test")
NUMBERS = [f"+1555560{i:04d}" for i in range(400)]
CODE = "123456"
UNLIMITED = {"capacity": 1_000_000, "permit_seconds": 0.000001}
# Limiters a test run would trip by registering many accounts from one address (they are shared by
# the nodes through Redis, per key prefix).
DEFAULT_LIMITS = {
    name: UNLIMITED
    for name in ("messages", "inboundMessageBytes", "verificationSessionPerIp", "verificationSessionPerNumber",
                 "registration", "allocateDevice", "verifyDevice", "waitForLinkedDevice")
}
MESSAGE_PATH = "/api/v1/message"
QUEUE_EMPTY_PATH = "/api/v1/queue/empty"
READY_SECONDS = 60.0


# -- availability (fail under CI=true, else skip) -----------------------------------------------------


def _unavailable(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} and CI=true: refusing to skip")
    pytest.skip(what)


def require_redis() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:
        _unavailable(f"Redis is not reachable at {REDIS_URL}")
    return REDIS_URL


def database_url(name: str) -> str:
    parts = urlsplit(PG_URL)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


async def _pg(url: str, *statements: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://", 1), timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def require_postgres() -> str:
    """The URL of the cluster tests' own database (created if missing)."""
    import asyncpg

    try:
        asyncio.run(_pg(PG_URL, "SELECT 1"))
    except Exception:
        _unavailable(f"PostgreSQL is not reachable at {PG_URL}")
    with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        asyncio.run(_pg(PG_URL, f'CREATE DATABASE "{CLUSTER_DATABASE}"'))
    return database_url(CLUSTER_DATABASE)


# -- nodes --------------------------------------------------------------------------------------------


class Node:
    """One `mailslot serve` process."""

    def __init__(self, index: int, config: Path, directory: Path) -> None:
        self.index = index  # 1-based, as in "node 2"
        self.config = config
        self.directory = directory
        self.log_path = directory / f"node-{index}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.starts = 0
        self._ready: dict[str, Any] = {}

    def spawn(self) -> None:
        self.starts += 1
        self._ready = {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAILSLOT_CLUSTER__NODE_ID": f"node-{self.index}"}
        log = self.log_path.open("a")
        log.write(f"--- start {self.starts} ---\n")
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailslot", "serve", "--config", str(self.config)],
            cwd=self.directory, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )
        log.close()
        proc, found = self.proc, self._ready

        def read() -> None:  # keeps reading, so that the pipe never fills
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("READY ") and not found:
                    found.update(json.loads(line[len("READY "):]))

        threading.Thread(target=read, daemon=True).start()

    def wait_ready(self, timeout: float = READY_SECONDS) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"node {self.index} did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        self.port = int(self._ready["port"])

    def start(self) -> None:
        self.spawn()
        self.wait_ready()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        return ""

    def log_problems(self) -> list[str]:
        problems = []
        with contextlib.suppress(OSError), self.log_path.open(errors="replace") as f:
            for line in f:
                if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line:
                    problems.append(f"node {self.index}: {line.strip()[:500]}")
        return problems

    def __repr__(self) -> str:
        return f"Node({self.index}, port={self.port}, alive={self.alive})"


@dataclass
class Cluster:
    directory: Path
    database_url: str
    schema: str
    redis_url: str
    key_prefix: str
    nodes: list[Node] = field(default_factory=list)
    _numbers: Iterator[str] = field(default_factory=lambda: iter(NUMBERS))

    def __getitem__(self, number: int) -> Node:
        """``cluster[1]`` is node 1 (1-based, as the tests speak of them)."""
        return self.nodes[number - 1]

    def number(self) -> str:
        """A test number not used before in this cluster (all accept code 123456)."""
        return next(self._numbers)

    def start(self) -> None:
        first, *rest = self.nodes
        first.start()  # generates the shared secrets and applies the migrations
        for node in rest:
            node.spawn()
        for node in rest:
            node.wait_ready()

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()

    def log_problems(self) -> list[str]:
        return [line for node in self.nodes for line in node.log_problems()]


def write_config(directory: Path, database_url: str, schema: str, redis_url: str, key_prefix: str,
                 sweep_seconds: float, rate_limits: dict[str, dict[str, float]]) -> Path:
    numbers = ", ".join(f'"{n}" = "{CODE}"' for n in NUMBERS)
    limits = "\n".join(
        f"{name} = {{ capacity = {limit['capacity']}, permit_seconds = {limit['permit_seconds']} }}"
        for name, limit in rate_limits.items()
    )
    config = directory / "mailslot.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n'
        f'[storage]\nurl = "{database_url}"\nschema = "{schema}"\ndata_dir = "{directory}/data"\npool_size = 5\n'
        f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "{key_prefix}"\nsweep_seconds = {sweep_seconds}\n'
        f"[registration]\ntest_numbers = {{ {numbers} }}\n"
        f"[rate_limits]\n{limits}\n"
    )
    return config


@contextlib.contextmanager
def running_cluster(directory: Path, nodes: int = 3, sweep_seconds: float = 300.0,
                    rate_limits: dict[str, dict[str, float]] | None = None) -> Iterator[Cluster]:
    """Start ``nodes`` nodes on a fresh schema and key prefix; stop them and remove both afterwards."""
    redis_url = require_redis()
    database = require_postgres()
    token = secrets.token_hex(4)
    schema, prefix = f"cluster_{os.getpid()}_{token}", f"mailslot-cluster-test-{token}"
    asyncio.run(_pg(database, f"CREATE SCHEMA {schema}"))
    directory.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, database, schema, redis_url, prefix, sweep_seconds,
                          {**DEFAULT_LIMITS, **(rate_limits or {})})
    cluster = Cluster(directory, database, schema, redis_url, prefix,
                      [Node(i + 1, config, directory) for i in range(nodes)])
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        asyncio.run(_pg(database, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        _delete_redis_keys(redis_url, prefix)


def _delete_redis_keys(url: str, prefix: str) -> None:
    import redis

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start:start + 500])
        finally:
            client.close()


# -- clients ------------------------------------------------------------------------------------------


def register(node: Node, number: str) -> TestAccount:
    """The whole registration flow (session, code, registration with signed keys) on ``node``."""
    with httpx.Client(base_url=node.http, timeout=20, trust_env=False) as client:
        return register_with(client, number)  # type: ignore[arg-type]


def message_body(content: bytes, timestamp: int = 1000, registration_id: int = 1234, kind: int = 1,
                 online: bool = False) -> dict[str, Any]:
    """A ``PUT /v1/messages/{destination}`` body for device 1 (kind 1: ciphertext, 6: sealed sender)."""
    return {"messages": [{"type": kind, "destinationDeviceId": 1, "destinationRegistrationId": registration_id,
                          "content": b64(content)}], "timestamp": timestamp, "online": online}


async def send(http: httpx.AsyncClient, sender: TestAccount, to: TestAccount, content: bytes,
               timestamp: int = 1000) -> httpx.Response:
    """``PUT /v1/messages/{to}`` with the sender's Basic credentials (an identified type-1 message)."""
    return await http.put(f"/v1/messages/{to.aci}", json=message_body(content, timestamp), headers=sender.auth)


def response_frame(request_id: int, status: int = 200) -> bytes:
    return WebSocketMessage(
        type=WebSocketMessage.RESPONSE, response=WebSocketResponseMessage(id=request_id, status=status)
    ).SerializeToString()


@dataclass
class Arrival:
    envelope: Envelope
    at: float  # time.monotonic()
    acknowledged_at: float | None = None


class Socket:
    """A device's authenticated WebSocket on one node.

    Answers ``PUT /api/v1/queue/empty`` and, when ``ack`` is true, every delivered envelope with 200 (as a
    client does); with ``ack`` false envelopes are left unanswered. ``arrivals`` lists every envelope in
    order of arrival; ``close_code`` is the code the server closed with (None while open; 1006 if the
    connection broke without a close frame)."""

    def __init__(self, ws: ClientConnection, node: Node, ack: bool = True) -> None:
        self.ws = ws
        self.node = node
        self.ack = ack
        self.arrivals: list[Arrival] = []
        self.queue_empty = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._responses: dict[int, asyncio.Future[WebSocketResponseMessage]] = {}
        self._next_id = 0
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, node: Node, auth: dict[str, str], ack: bool = True, wait_empty: bool = True) -> Socket:
        ws = await connect(f"{node.ws}/v1/websocket/", additional_headers=auth, ping_interval=None,
                           open_timeout=10, max_size=2**22, proxy=None)
        socket = cls(ws, node, ack)
        if wait_empty:
            async with asyncio.timeout(10):
                await socket.queue_empty.wait()
        return socket

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if not isinstance(data, bytes):
                    continue
                frame = WebSocketMessage.FromString(data)
                if frame.type == WebSocketMessage.RESPONSE:
                    waiter = self._responses.pop(frame.response.id, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(frame.response)
                    continue
                if frame.type != WebSocketMessage.REQUEST:
                    continue
                request = frame.request
                if request.path == MESSAGE_PATH:
                    arrival = Arrival(Envelope.FromString(request.body), time.monotonic())
                    self.arrivals.append(arrival)
                    if self.ack:
                        await self.ws.send(response_frame(request.id))
                        arrival.acknowledged_at = time.monotonic()
                else:
                    if request.path == QUEUE_EMPTY_PATH:
                        self.queue_empty.set()
                    await self.ws.send(response_frame(request.id))
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code or 1006
            self.closed.set()
            self._changed.set()

    @property
    def envelopes(self) -> list[Envelope]:
        return [a.envelope for a in self.arrivals]

    async def request(self, verb: str, path: str, body: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None, within: float = 10.0) -> WebSocketResponseMessage:
        """A request tunnelled over this socket (as clients send ``PUT /v1/messages/...``); its response."""
        self._next_id += 1
        request_id = self._next_id
        waiter: asyncio.Future[WebSocketResponseMessage] = asyncio.get_running_loop().create_future()
        self._responses[request_id] = waiter
        header_lines = [f"{name.lower()}:{value}" for name, value in (headers or {}).items()]
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            header_lines.append("content-type:application/json")
        frame = WebSocketMessage(type=WebSocketMessage.REQUEST, request=WebSocketRequestMessage(
            verb=verb, path=path, body=payload, headers=header_lines, id=request_id))
        await self.ws.send(frame.SerializeToString())
        async with asyncio.timeout(within):
            return await waiter

    async def wait_for(self, count: int, within: float = 5.0) -> list[Envelope]:
        """The first ``count`` envelopes (waiting up to ``within`` seconds for them)."""
        async with asyncio.timeout(within):
            while len(self.arrivals) < count:
                if self.closed.is_set():
                    raise AssertionError(f"socket on node {self.node.index} closed ({self.close_code}) after "
                                         f"{len(self.arrivals)} of {count} envelopes")
                self._changed.clear()
                await self._changed.wait()
        return self.envelopes[:count]

    async def wait_closed(self, within: float = 5.0) -> int | None:
        async with asyncio.timeout(within):
            await self.closed.wait()
        return self.close_code

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(BaseException):
            await self._reader


# -- provisioning socket ------------------------------------------------------------------------------


class ProvisioningSocket:
    """``/v1/websocket/provisioning/``: the first request announces the address."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, node: Node) -> tuple[ProvisioningSocket, str]:
        ws = await connect(f"{node.ws}/v1/websocket/provisioning/", ping_interval=None, open_timeout=10,
                           proxy=None)
        socket = cls(ws)
        request = await socket.next_request()
        assert (request.verb, request.path) == ("PUT", "/v1/address"), request
        body = request.body
        assert body[0] == 0x0A and body[1] == len(body) - 2, "ProvisioningAddress: field 1 only"
        await socket.answer(request)
        return socket, body[2:].decode()

    async def next_request(self, within: float = 5.0) -> WebSocketRequestMessage:
        async with asyncio.timeout(within):
            while True:
                data = await self.ws.recv()
                frame = WebSocketMessage.FromString(data if isinstance(data, bytes) else data.encode())
                if frame.type == WebSocketMessage.REQUEST:
                    return frame.request

    async def answer(self, request: WebSocketRequestMessage, status: int = 200) -> None:
        await self.ws.send(response_frame(request.id, status))

    async def wait_closed(self, within: float = 5.0) -> int | None:
        async with asyncio.timeout(within):
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await self.ws.recv()
        return self.ws.close_code or 1006

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


def mime_b64(data: bytes) -> str:
    return base64.encodebytes(data).decode()
