"""Load generator: message delivery over WebSockets, end to end (not a test).

Starts ``mailslot serve`` as a subprocess (embedded SQLite in a temporary directory, or PostgreSQL in a
throw-away schema), registers N sender/receiver pairs through the real HTTP flow, keeps every receiver
on an authenticated WebSocket and every sender on a socket of its own, and sends
``PUT /v1/messages/{receiver}`` tunnelled over the sender's socket, either at a fixed offered rate
spread over the pairs or as fast as the server answers (a bounded number of outstanding sends per
sender). Receivers (and, in identified mode, senders for their delivery receipts) ack every server
request with 200, as a client does.

Each message's content (~200 bytes) starts with its sequence number, the send time and the pair index,
so the receiving side measures send-to-arrival latency and counts lost, duplicated and misrouted
messages without any shared state with the server. Envelopes are checked for the fields §5.3 asks
for (type, client timestamp, service ids in both forms, source device, server GUID); receipts for
their source, destination and timestamp.

Modes: ``--mode identified`` (default: authenticated sender sockets, type 1 messages, delivery
receipts come back to the sender) or ``--mode sealed`` (anonymous sender sockets, type 6 messages with
the receiver's Unidentified-Access-Key; senders are not registered at all).

    .venv/bin/python bench/delivery.py                          # embedded default, 1,000 msg/s for 10 s
    .venv/bin/python bench/delivery.py --rate 0                 # as fast as possible
    .venv/bin/python bench/delivery.py --mode sealed --pairs 100 --rate 2800
    .venv/bin/python bench/delivery.py --storage-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/delivery.py --json                   # one JSON object on stdout
    .venv/bin/python bench/delivery.py --storage-url postgresql://postgres@127.0.0.1:5432/test \\
        --redis-url redis://127.0.0.1:6379/0 --nodes 3          # cluster mode: three server processes

Cluster mode (``--nodes N``, ``--redis-url``): N ``mailslot serve`` processes share the PostgreSQL schema,
the generated secrets (one data directory) and Redis (a key prefix of their own). The generator is the
load balancer: pair i's receiver keeps its socket on node i mod N and its sender on node (i + 1) mod N,
so with N > 1 every message, and every delivery receipt, crosses nodes. ``--nodes 1 --redis-url`` runs
one node in cluster mode (the baseline for the same code path). Server CPU is summed over the nodes.

The load generator is one asyncio process (uvloop when installed) on the same machine as the server;
its CPU use is reported next to the server's, since they compete for the same cores. Latency is
measured from just before a send frame is written to just after the pushed envelope is parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection, connect

from mailslot.crypto import xeddsa
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import WebSocketMessage, WebSocketRequestMessage, WebSocketResponseMessage

CODE = "123456"
CONTENT_BYTES = 200
PREFIX = struct.Struct(">QqH")  # sequence number, send time (monotonic ns), pair index: 18 bytes
REQUEST = WebSocketMessage.REQUEST
RESPONSE = WebSocketMessage.RESPONSE
CIPHERTEXT, RECEIPT, SEALED = 1, 5, 6
CLK_TCK = os.sysconf("SC_CLK_TCK")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + b64(f"{user}:{password}".encode())


def number(i: int) -> str:
    return f"+1555700{i:04d}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the server ----------------------------------------------------------------------------------


def write_config(directory: Path, numbers: int, storage_url: str | None, schema: str | None,
                 access_log: bool, redis_url: str | None = None, key_prefix: str | None = None) -> Path:
    url = storage_url or f"sqlite:///{directory}/mailslot.db"
    unlimited = "{ capacity = 1000000, permit_seconds = 0.000001 }"
    test_numbers = "\n".join(f'"{number(i)}" = "{CODE}"' for i in range(numbers))
    config = directory / "mailslot.toml"
    config.write_text(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\n"
        f"[storage]\nurl = \"{url}\"\ndata_dir = \"{directory}/data\"\n"
        + (f"schema = \"{schema}\"\n" if schema else "")
        + f"[logging]\naccess_log = {'true' if access_log else 'false'}\n"
        "[registration]\nsms_provider = \"console\"\n[registration.test_numbers]\n" + test_numbers + "\n"
        "[rate_limits]\n"
        f"messages = {unlimited}\n"
        f"inboundMessageBytes = {unlimited}\n"
        f"verificationSessionPerIp = {unlimited}\n"
        + (f"[cluster]\nredis_url = \"{redis_url}\"\nkey_prefix = \"{key_prefix}\"\n" if redis_url else "")
    )
    return config


def start_server(config: Path, directory: Path, log_name: str = "server.log",
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    return wait_ready(spawn_server(config, directory, log_name, env), directory / log_name)


def spawn_server(config: Path, directory: Path, log_name: str = "server.log",
                 env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    script = Path(sys.executable).with_name("mailslot")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mailslot"]
    with (directory / log_name).open("w") as log_file:
        return subprocess.Popen(  # noqa: S603 - our own server binary and a config we wrote
            [*command, "serve", "--config", str(config)], cwd=directory, stdout=subprocess.PIPE, stderr=log_file,
            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def wait_ready(proc: subprocess.Popen[str], log_path: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    assert proc.stdout is not None
    found: dict[str, Any] = {}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY ") and not found:
                found.update(json.loads(line[len("READY "):]))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start; see {log_path}")
        time.sleep(0.05)
    return proc, found


def stop_server(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_nodes(config: Path, directory: Path, nodes: int) -> list[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """One server, or (cluster mode) node 1 first — it generates the shared secrets into the data
    directory and applies the migrations — then the others together."""
    if nodes == 1:
        return [start_server(config, directory)]
    started = [start_server(config, directory, "server-1.log", {"MAILSLOT_CLUSTER__NODE_ID": "node-1"})]
    spawned = [spawn_server(config, directory, f"server-{i}.log", {"MAILSLOT_CLUSTER__NODE_ID": f"node-{i}"})
               for i in range(2, nodes + 1)]
    try:
        for i, proc in enumerate(spawned, start=2):
            started.append(wait_ready(proc, directory / f"server-{i}.log"))
    except BaseException:
        for proc in [p for p, _ in started] + spawned:
            stop_server(proc)
        raise
    return started


def node_logs(directory: Path, nodes: int) -> list[Path]:
    return [directory / "server.log"] if nodes == 1 else [directory / f"server-{i}.log" for i in range(1, nodes + 1)]


async def redis_cleanup(url: str, prefix: str) -> None:
    """Delete this run's keys (rate-limit buckets, tickets) from the shared Redis."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start:start + 500])
    finally:
        await client.aclose()


async def pg_schema(url: str, create: bool, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"))
    try:
        await conn.execute(f"CREATE SCHEMA {schema}" if create else f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


def process_cpu(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 if it is gone. With
    ``reaped_children``, plus cutime + cstime: the CPU of children that exited and were waited for."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc_pid_stat(5)
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # fields 16 and 17
    return ticks / CLK_TCK


def postgres_cpu(comm: bytes = b"postgres") -> float | None:
    """Summed CPU of the local ``postgres`` processes (None if none is visible on this machine),
    including backends that exited meanwhile (they are in the postmaster's reaped-children time).
    ``comm=b"redis-server"``: the same for Redis."""
    total, seen = 0.0, False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:
                if f.read().strip() != comm:
                    continue
        except OSError:
            continue
        seen = True
        total += process_cpu(int(entry), reaped_children=True)
    return total if seen else None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- accounts ------------------------------------------------------------------------------------


@dataclass
class Account:
    aci: str
    password: str
    uak: bytes
    registration_id: int

    @property
    def authorization(self) -> str:
        return basic(f"{self.aci}.1", self.password)


def signed(private: bytes, key_id: int, public: bytes) -> dict[str, Any]:
    return {"keyId": key_id, "publicKey": b64(public), "signature": b64(xeddsa.sign(private, public))}


def kem_public() -> bytes:
    return b"\x08" + os.urandom(1568)


async def register(http: httpx.AsyncClient, phone: str) -> Account:
    """The whole flow a client goes through (as tests/helpers.py ``registration_body`` builds it)."""
    response = await http.post("/v1/verification/session", json={"number": phone})
    response.raise_for_status()
    session_id = response.json()["id"]
    (await http.post(f"/v1/verification/session/{session_id}/code",
                     json={"transport": "sms", "client": "bench"})).raise_for_status()
    response = await http.put(f"/v1/verification/session/{session_id}/code", json={"code": CODE})
    response.raise_for_status()
    assert response.json().get("verified"), response.text
    aci_private, aci_public = xeddsa.generate_keypair()
    pni_private, pni_public = xeddsa.generate_keypair()
    uak, password = secrets.token_bytes(16), secrets.token_urlsafe(18)
    registration_id = 1 + secrets.randbelow(16380)
    body = {
        "sessionId": session_id,
        "accountAttributes": {
            "fetchesMessages": True, "registrationId": registration_id,
            "pniRegistrationId": 1 + secrets.randbelow(16380),
            "capabilities": {"spqr": True, "storage": True}, "unidentifiedAccessKey": b64(uak),
            "unrestrictedUnidentifiedAccess": False, "discoverableByPhoneNumber": True,
        },
        "skipDeviceTransfer": True,
        "aciIdentityKey": b64(aci_public),
        "pniIdentityKey": b64(pni_public),
        "aciSignedPreKey": signed(aci_private, 1, xeddsa.generate_keypair()[1]),
        "pniSignedPreKey": signed(pni_private, 2, xeddsa.generate_keypair()[1]),
        "aciPqLastResortPreKey": signed(aci_private, 3, kem_public()),
        "pniPqLastResortPreKey": signed(pni_private, 4, kem_public()),
    }
    response = await http.post("/v1/registration", json=body,
                               headers={"Authorization": basic(phone, password)})
    if response.status_code != 200:
        raise SystemExit(f"registration of {phone} failed: {response.status_code} {response.text}")
    return Account(response.json()["uuid"], password, uak, registration_id)


# -- the measurement -----------------------------------------------------------------------------


@dataclass
class Stats:
    """Everything counted, by sequence number (the index into the per-message lists)."""

    send_ns: list[int] = field(default_factory=list)        # actual send time of each seq
    timestamp_ms: list[int] = field(default_factory=list)   # the client timestamp it carried
    pair_index: list[int] = field(default_factory=list)
    answered: bytearray = field(default_factory=bytearray)  # 1 = 200, 2 = other status
    answered_ns: list[int] = field(default_factory=list)
    delivered: bytearray = field(default_factory=bytearray)  # arrival count (capped at 255)
    receipted: bytearray = field(default_factory=bytearray)
    latency_ns: dict[int, int] = field(default_factory=dict)  # first arrival only
    statuses: Counter[int] = field(default_factory=Counter)
    first_bodies: dict[int, str] = field(default_factory=dict)
    duplicates: int = 0
    misrouted: int = 0
    unknown_content: int = 0
    reordered: int = 0
    order_violations: int = 0
    receipts: int = 0
    receipt_duplicates: int = 0
    receipt_errors: int = 0
    envelope_errors: Counter[str] = field(default_factory=Counter)
    other_requests: Counter[str] = field(default_factory=Counter)
    queue_empty: int = 0
    send_lag_max_ns: int = 0
    # The measured window.
    window_start_ns: int = 0
    window_end_ns: int = 0
    window_arrivals: int = 0
    counting: bool = False

    def new_seq(self, now_ns: int, timestamp_ms: int, pair: int) -> int:
        seq = len(self.send_ns)
        self.pair_index.append(pair)
        self.send_ns.append(now_ns)
        self.timestamp_ms.append(timestamp_ms)
        self.answered.append(0)
        self.answered_ns.append(0)
        self.delivered.append(0)
        self.receipted.append(0)
        return seq

    def pair_of(self, seq: int) -> int:
        return self.pair_index[seq]

    def envelope_error(self, what: str) -> None:
        self.envelope_errors[what] += 1


def ack_frame(request_id: int) -> bytes:
    return WebSocketMessage(
        type=RESPONSE, response=WebSocketResponseMessage(id=request_id, status=200, message="OK")
    ).SerializeToString()


class Pair:
    def __init__(self, index: int, receiver: Account, sender: Account | None, sealed: bool, stats: Stats) -> None:
        self.index = index
        self.receiver = receiver
        self.sender = sender
        self.sealed = sealed
        self.stats = stats
        self.receiver_ws: ClientConnection | None = None
        self.sender_ws: ClientConnection | None = None
        self.receiver_aci_bytes = uuid.UUID(receiver.aci).bytes
        self.sender_aci_bytes = uuid.UUID(sender.aci).bytes if sender else b""
        self.tail = os.urandom(CONTENT_BYTES - PREFIX.size)
        self.tail_b64 = base64.b64encode(self.tail)  # PREFIX.size is a multiple of 3: concatenation is valid
        kind = SEALED if sealed else CIPHERTEXT
        self.body_head = (
            f'{{"messages":[{{"type":{kind},"destinationDeviceId":1,'
            f'"destinationRegistrationId":{receiver.registration_id},"content":"'
        ).encode()
        self.path = f"/v1/messages/{receiver.aci}"
        self.headers = ["content-type:application/json"]
        if sealed:
            self.headers.append(f"unidentified-access-key:{b64(receiver.uak)}")
        self.next_id = 1
        self.pending: dict[int, int] = {}  # request id -> seq
        self.last_seq_seen = -1
        self.last_timestamp = 0
        self.slots: asyncio.Semaphore | None = None
        self.seq_by_timestamp: dict[int, int] = {}
        self.ready = asyncio.Event()        # the receiver's queue/empty arrived
        self.sender_ready = asyncio.Event()
        self.expected_type = kind
        self.receiver_node = 0  # indices into the nodes' socket URLs (cluster mode: the generator balances)
        self.sender_node = 0

    # -- sending

    def frame(self) -> tuple[int, bytes]:
        stats = self.stats
        timestamp = max(time.time_ns() // 1_000_000, self.last_timestamp + 1)  # unique per sender
        self.last_timestamp = timestamp
        now = time.monotonic_ns()
        seq = stats.new_seq(now, timestamp, self.index)
        if not self.sealed:
            self.seq_by_timestamp[timestamp] = seq  # receipts name the message by its timestamp
        prefix = base64.b64encode(PREFIX.pack(seq, now, self.index))
        body = b"".join((self.body_head, prefix, self.tail_b64, b'"}],"timestamp":', str(timestamp).encode(),
                         b',"online":false,"urgent":true}'))
        request_id = self.next_id
        self.next_id += 1
        self.pending[request_id] = seq
        message = WebSocketMessage(type=REQUEST, request=WebSocketRequestMessage(
            verb="PUT", path=self.path, body=body, id=request_id, headers=self.headers))
        return seq, message.SerializeToString()

    async def send_one(self) -> None:
        assert self.sender_ws is not None
        _, data = self.frame()
        await self.sender_ws.send(data)

    # -- reading

    async def read_sender(self) -> None:
        assert self.sender_ws is not None
        ws, stats = self.sender_ws, self.stats
        with contextlib.suppress(websockets.ConnectionClosed):
            async for data in ws:
                if not isinstance(data, bytes):
                    continue
                message = WebSocketMessage.FromString(data)
                if message.type == RESPONSE:
                    response = message.response
                    seq = self.pending.pop(response.id, None)
                    if seq is None:
                        continue
                    status = response.status
                    stats.answered_ns[seq] = time.monotonic_ns()
                    if status == 200:
                        stats.answered[seq] = 1
                    else:
                        stats.answered[seq] = 2
                        stats.statuses[status] += 1
                        if status not in stats.first_bodies:
                            stats.first_bodies[status] = response.body[:300].decode("utf-8", "replace")
                    if self.slots is not None:
                        self.slots.release()
                elif message.type == REQUEST:
                    request = message.request
                    if request.path == "/api/v1/message":
                        self.on_receipt(request.body)
                    elif request.path == "/api/v1/queue/empty":
                        self.sender_ready.set()
                    else:
                        stats.other_requests[f"{request.verb} {request.path}"] += 1
                    await ws.send(ack_frame(request.id))

    def on_receipt(self, body: bytes) -> None:
        stats = self.stats
        envelope = Envelope.FromString(body)
        if envelope.type != RECEIPT:
            stats.receipt_errors += 1
            stats.envelope_error(f"sender got a non-receipt envelope of type {envelope.type}")
            return
        stats.receipts += 1
        if envelope.source_service_id != self.receiver_aci_bytes:
            stats.envelope_error("receipt: source_service_id is not the receiver's ACI")
        if envelope.destination_service_id != self.sender_aci_bytes:
            stats.envelope_error("receipt: destination_service_id is not the sender's ACI")
        if envelope.source_device != 1:
            stats.envelope_error("receipt: source_device is not 1")
        seq = self.seq_by_timestamp.get(envelope.client_timestamp)
        if seq is None:
            stats.receipt_errors += 1
            stats.envelope_error("receipt: client_timestamp matches no message of this sender")
            return
        if stats.receipted[seq]:
            stats.receipt_duplicates += 1
        stats.receipted[seq] = 1

    async def read_receiver(self) -> None:
        assert self.receiver_ws is not None
        ws, stats = self.receiver_ws, self.stats
        with contextlib.suppress(websockets.ConnectionClosed):
            async for data in ws:
                if not isinstance(data, bytes):
                    continue
                message = WebSocketMessage.FromString(data)
                if message.type != REQUEST:
                    continue
                request = message.request
                if request.path == "/api/v1/message":
                    self.on_message(request.body)
                elif request.path == "/api/v1/queue/empty":
                    stats.queue_empty += 1
                    self.ready.set()
                else:
                    stats.other_requests[f"{request.verb} {request.path}"] += 1
                await ws.send(ack_frame(request.id))

    def on_message(self, body: bytes) -> None:
        now = time.monotonic_ns()
        stats = self.stats
        envelope = Envelope.FromString(body)
        content = envelope.content
        if len(content) != CONTENT_BYTES or content[PREFIX.size:] != self.tail:
            stats.unknown_content += 1
            return
        seq, sent_ns, pair = PREFIX.unpack_from(content)
        if pair != self.index or seq >= len(stats.send_ns) or stats.send_ns[seq] != sent_ns:
            stats.misrouted += 1
            return
        count = stats.delivered[seq]
        if count:
            stats.duplicates += 1
            stats.delivered[seq] = min(255, count + 1)
            return
        stats.delivered[seq] = 1
        stats.latency_ns[seq] = now - sent_ns
        if stats.counting:
            stats.window_arrivals += 1
        if seq < self.last_seq_seen:
            # An older message after a newer one of the same sender: a violation of per-sender order if
            # the older one's 200 had come back before the newer one was sent, else concurrent sends.
            answered = stats.answered_ns[seq]
            if answered and answered < stats.send_ns[self.last_seq_seen]:
                stats.order_violations += 1
            else:
                stats.reordered += 1
        else:
            self.last_seq_seen = seq
        # The shape of what §5.3 / §6.4 promise (cheap field comparisons only).
        if envelope.type != self.expected_type:
            stats.envelope_error(f"type {envelope.type}, expected {self.expected_type}")
        if envelope.client_timestamp != stats.timestamp_ms[seq]:
            stats.envelope_error("client_timestamp differs from the request's timestamp")
        if not envelope.server_timestamp:
            stats.envelope_error("no server_timestamp")
        if envelope.destination_service_id != self.receiver_aci_bytes:
            stats.envelope_error("destination_service_id is not the receiver's ACI (16 bytes)")
        if envelope.destination_service_id_string != self.receiver.aci:
            stats.envelope_error("destination_service_id_string (13) is not the receiver's ACI")
        if len(envelope.server_guid) != 16:
            stats.envelope_error("server_guid (21) is not 16 bytes")
        elif envelope.server_guid_string != str(uuid.UUID(bytes=envelope.server_guid)):
            stats.envelope_error("server_guid_string (9) does not match server_guid (21)")
        if envelope.HasField("ephemeral"):
            stats.envelope_error("ephemeral field not cleared before delivery")
        if self.sealed:
            if envelope.HasField("source_service_id") or envelope.HasField("source_device"):
                stats.envelope_error("sealed-sender envelope carries a source")
        else:
            if envelope.source_service_id != self.sender_aci_bytes:
                stats.envelope_error("source_service_id is not the sender's ACI (16 bytes)")
            if envelope.source_service_id_string != (self.sender.aci if self.sender else ""):
                stats.envelope_error("source_service_id_string (11) is not the sender's ACI")
            if envelope.source_device != 1:
                stats.envelope_error("source_device is not 1")


async def open_sockets(pairs: list[Pair], ws_urls: list[str], deflate: bool) -> list[asyncio.Task[None]]:
    """Open every pair's sockets (each on its node's URL), start their readers, wait for each queue/empty."""
    options: dict[str, Any] = {"compression": "deflate" if deflate else None, "max_size": 2**20,
                               "ping_interval": None, "open_timeout": 30, "max_queue": None, "proxy": None}

    async def one(pair: Pair) -> None:
        receiver_url, sender_url = ws_urls[pair.receiver_node], ws_urls[pair.sender_node]
        pair.receiver_ws = await connect(
            receiver_url, additional_headers={"Authorization": pair.receiver.authorization}, **options)
        if pair.sealed or pair.sender is None:
            pair.sender_ws = await connect(sender_url, **options)
            pair.sender_ready.set()
        else:
            pair.sender_ws = await connect(
                sender_url, additional_headers={"Authorization": pair.sender.authorization}, **options)

    semaphore = asyncio.Semaphore(16)

    async def bounded(pair: Pair) -> None:
        async with semaphore:
            await one(pair)

    for pair in pairs:
        pair.ready.clear()
        pair.sender_ready.clear()
    await asyncio.gather(*(bounded(p) for p in pairs))
    readers = [asyncio.create_task(p.read_receiver()) for p in pairs]
    readers += [asyncio.create_task(p.read_sender()) for p in pairs]
    try:
        await asyncio.wait_for(asyncio.gather(*(p.ready.wait() for p in pairs),
                                              *(p.sender_ready.wait() for p in pairs)), 10)
    except TimeoutError:
        log("warning: not every socket got PUT /api/v1/queue/empty within 10 s")
    return readers


async def rate_sender(pairs: list[Pair], rate: float, stop_ns: int, stats: Stats) -> None:
    """One ticker for all pairs: every millisecond or so, send what is due (open loop)."""
    start = time.monotonic_ns()
    interval_ns = 1e9 / rate
    sent = 0
    n = len(pairs)
    while True:
        now = time.monotonic_ns()
        if now >= stop_ns:
            return
        due = int((now - start) / interval_ns) + 1
        while sent < due:
            lag = now - int(start + sent * interval_ns)
            stats.send_lag_max_ns = max(stats.send_lag_max_ns, lag)
            await pairs[sent % n].send_one()
            sent += 1
        next_at = start + sent * interval_ns
        await asyncio.sleep(max(0.0, (next_at - time.monotonic_ns()) / 1e9))


async def flood_sender(pair: Pair, stop_ns: int) -> None:
    """As fast as the server answers: at most ``slots`` sends outstanding on this socket."""
    assert pair.slots is not None
    while time.monotonic_ns() < stop_ns:
        await pair.slots.acquire()
        if time.monotonic_ns() >= stop_ns:
            pair.slots.release()
            return
        await pair.send_one()


async def start_profiler(args: argparse.Namespace, server_pid: int) -> asyncio.subprocess.Process | None:
    """py-spy on the server for the measured window (``--profile``): collapsed stacks to a file."""
    if not args.profile:
        return None
    py_spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if py_spy is None:
        log("warning: --profile needs py-spy on PATH (or PY_SPY=/path/to/py-spy); not profiling")
        return None
    return await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(server_pid), "--duration", str(max(1, round(args.seconds))),
        "--rate", "200", "--nonblocking", "--format", "raw", "--output", args.profile,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


def profile_summary(path: str, top: int = 15) -> list[str]:
    """The functions with most samples on top of the stack (self time) and, for mailslot's own code,
    the most samples anywhere in the stack (inclusive)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip().rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            own[frames[-1]] += count
            for frame in {f for f in frames if "mailslot" in f}:
                inclusive[frame] += count
    if not total:
        return []
    lines = [f"py-spy: {total} samples of the server; self time:"]
    lines += [f"  {100 * n / total:5.1f} %  {frame[:150]}" for frame, n in own.most_common(top)]
    lines.append("mailslot frames, inclusive:")
    lines += [f"  {100 * n / total:5.1f} %  {frame[:150]}" for frame, n in inclusive.most_common(top)]
    return lines


def percentile(ordered: list[int], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1e6


async def bench(args: argparse.Namespace, base_urls: list[str], server_pids: list[int]) -> dict[str, Any]:
    stats = Stats()
    sealed = args.mode == "sealed"
    setup_started = time.perf_counter()
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=60, limits=limits, trust_env=False)) for url in base_urls]
        semaphore = asyncio.Semaphore(16)

        async def reg(i: int) -> Account:
            async with semaphore:  # registrations are spread over the nodes too
                return await register(clients[i % len(clients)], number(i))

        receivers = await asyncio.gather(*(reg(i) for i in range(args.pairs)))
        senders: list[Account | None] = (
            [None] * args.pairs if sealed
            else list(await asyncio.gather(*(reg(args.pairs + i) for i in range(args.pairs))))
        )
    registered = len(receivers) + sum(s is not None for s in senders)
    log(f"registered {registered} accounts in {time.perf_counter() - setup_started:.1f} s")

    pairs = [Pair(i, r, s, sealed, stats) for i, (r, s) in enumerate(zip(receivers, senders, strict=True))]
    nodes = len(base_urls)
    for pair in pairs:  # with several nodes, every pair's sender and receiver are on different nodes
        pair.receiver_node, pair.sender_node = pair.index % nodes, (pair.index + 1) % nodes
    if args.rate == 0:
        for pair in pairs:
            pair.slots = asyncio.Semaphore(args.inflight)

    ws_urls = [url.replace("http://", "ws://", 1) + "/v1/websocket/" for url in base_urls]
    readers = await open_sockets(pairs, ws_urls, args.deflate)
    log(f"{len(pairs)} receiver and {len(pairs)} {'anonymous' if sealed else 'authenticated'} sender sockets "
        f"open; warm-up {args.warmup} s, then measuring {args.seconds} s at "
        + (f"{args.rate:g} msg/s offered" if args.rate else f"full speed ({args.inflight} outstanding per sender)"))

    def servers_cpu() -> float:
        return sum(process_cpu(pid) for pid in server_pids)

    def redis_cpu() -> float | None:
        return postgres_cpu(b"redis-server") if args.redis_url else None

    async def measure() -> dict[str, float]:
        await asyncio.sleep(args.warmup)
        profiler = await start_profiler(args, server_pids[0])  # node 1 only, in cluster mode
        before = (servers_cpu(), self_cpu(), postgres_cpu(), machine_cpu(), time.monotonic_ns(), redis_cpu())
        stats.window_start_ns = before[4]
        stats.counting = True
        await asyncio.sleep(args.seconds)
        stats.counting = False
        after = (servers_cpu(), self_cpu(), postgres_cpu(), machine_cpu(), time.monotonic_ns(), redis_cpu())
        stats.window_end_ns = after[4]
        if profiler is not None:
            await profiler.wait()
        wall = (after[4] - before[4]) / 1e9
        busy = (after[3][0] - before[3][0]) / max(1, after[3][1] - before[3][1])
        return {
            "wall": wall,
            "server_cpu": after[0] - before[0],
            "generator_cpu": after[1] - before[1],
            "postgres_cpu": (after[2] - before[2]) if after[2] is not None and before[2] is not None else -1.0,
            "machine_busy": busy,
            "redis_cpu": (after[5] - before[5]) if after[5] is not None and before[5] is not None else -1.0,
        }

    stop_ns = time.monotonic_ns() + int((args.warmup + args.seconds) * 1e9)
    measurer = asyncio.create_task(measure())
    if args.rate:
        await rate_sender(pairs, args.rate, stop_ns, stats)
    else:
        await asyncio.gather(*(flood_sender(p, stop_ns) for p in pairs))
    cpu = await measurer

    # Stragglers: wait for every answer, every delivery of a 200, and (identified) every receipt.
    drained = await drain(pairs, stats, args.drain, receipts=not sealed)
    await asyncio.sleep(0.2)  # let late duplicates show up
    await close_sockets(pairs, readers)
    result = summarize(args, stats, cpu, drained)
    if args.samples:
        write_samples(args.samples, stats)

    # Anything missing: still queued (reconnecting delivers it) or gone? Reported apart, never as delivered.
    lost = {s for s in range(len(stats.send_ns)) if stats.answered[s] == 1 and not stats.delivered[s]}
    unreceipted = set() if sealed else {
        s for s in range(len(stats.send_ns)) if stats.delivered[s] and not stats.receipted[s]}
    if lost or unreceipted:
        log(f"{len(lost)} messages and {len(unreceipted)} receipts missing: reconnecting every socket to see "
            "whether they are still queued")
        readers = await open_sockets(pairs, ws_urls, args.deflate)
        await drain(pairs, stats, args.drain, receipts=not sealed)
        await close_sockets(pairs, readers)
        result["total"]["lost_delivered_after_reconnect"] = sum(1 for s in lost if stats.delivered[s])
        if not sealed:
            result["total"]["receipts_missing_delivered_after_reconnect"] = sum(
                1 for s in unreceipted if stats.receipted[s])
    return result


def write_samples(path: str, stats: Stats) -> None:
    """One CSV line per message: times in ms from the window start (empty = never happened)."""
    origin = stats.window_start_ns

    def ms(ns: int) -> str:
        return f"{(ns - origin) / 1e6:.3f}"

    with open(path, "w") as f:
        f.write("seq,pair,sent_ms,answered_ms,status_ok,latency_ms\n")
        for seq, sent in enumerate(stats.send_ns):
            answered = stats.answered_ns[seq]
            latency = stats.latency_ns.get(seq)
            f.write(f"{seq},{stats.pair_index[seq]},{ms(sent)},{ms(answered) if answered else ''},"
                    f"{int(stats.answered[seq] == 1)},{'' if latency is None else f'{latency / 1e6:.3f}'}\n")


async def drain(pairs: list[Pair], stats: Stats, seconds: float, receipts: bool) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        unanswered = sum(len(p.pending) for p in pairs)
        missing = sum(1 for s, d in zip(stats.answered, stats.delivered, strict=True) if s == 1 and not d)
        unreceipted = receipts and any(
            d and not r for d, r in zip(stats.delivered, stats.receipted, strict=True))
        if not (unanswered or missing or unreceipted):
            break
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def close_sockets(pairs: list[Pair], readers: list[asyncio.Task[None]]) -> None:
    """Close every socket; sends still unanswered stay unanswered."""
    for pair in pairs:
        pair.pending.clear()
        for ws in (pair.sender_ws, pair.receiver_ws):
            if ws is not None:
                await ws.close()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)


def summarize(args: argparse.Namespace, stats: Stats, cpu: dict[str, float], drained: float) -> dict[str, Any]:
    total = len(stats.send_ns)
    window = [s for s in range(total) if stats.window_start_ns <= stats.send_ns[s] < stats.window_end_ns]
    ok = [s for s in range(total) if stats.answered[s] == 1]
    ok_window = [s for s in window if stats.answered[s] == 1]
    lost = [s for s in ok if not stats.delivered[s]]
    lost_window = [s for s in ok_window if not stats.delivered[s]]
    latencies = sorted(stats.latency_ns[s] for s in window if s in stats.latency_ns)
    delivered_total = sum(1 for d in stats.delivered if d)
    # Fairness: each pair's median latency in the window (a starved queue shows as a high maximum).
    by_pair: dict[int, list[int]] = {}
    for s in window:
        if s in stats.latency_ns:
            by_pair.setdefault(stats.pair_index[s], []).append(stats.latency_ns[s])
    pair_medians = sorted(percentile(sorted(v), 0.5) for v in by_pair.values())
    wall = cpu["wall"]
    arrivals = stats.window_arrivals
    identified = args.mode == "identified"
    result: dict[str, Any] = {
        "code": code_version(),
        "storage": "postgresql" if args.storage_url else "sqlite",
        "nodes": args.nodes,
        "redis": bool(args.redis_url),
        # Pair i: receiver on node i mod N, sender on node (i + 1) mod N: with N > 1 every message crosses.
        "cross_node_share": 1.0 if args.nodes > 1 else 0.0,
        "mode": args.mode,
        "pairs": args.pairs,
        "offered_rate": args.rate or None,
        "inflight_per_sender": args.inflight if not args.rate else None,
        "window_seconds": round(wall, 3),
        "window": {
            "sent": len(window),
            "sent_200": len(ok_window),
            "delivered": sum(1 for s in ok_window if stats.delivered[s]),
            "lost": len(lost_window),
            "sent_per_second": round(len(window) / wall, 1),
            "delivered_per_second": round(arrivals / wall, 1),
            "latency_ms": {
                "p50": round(percentile(latencies, 0.50), 2),
                "p95": round(percentile(latencies, 0.95), 2),
                "p99": round(percentile(latencies, 0.99), 2),
                "max": round(latencies[-1] / 1e6, 2) if latencies else None,
            },
            "pair_median_latency_ms": {
                "min": round(pair_medians[0], 2) if pair_medians else None,
                "max": round(pair_medians[-1], 2) if pair_medians else None,
            },
        },
        "total": {
            "sent": total,
            "sent_200": len(ok),
            "delivered": delivered_total,
            "lost": len(lost),
            "delivered_without_200": sum(1 for s in range(total) if stats.delivered[s] and stats.answered[s] != 1),
            "unanswered": sum(1 for a in stats.answered if a == 0),
            "duplicates": stats.duplicates,
            "misrouted": stats.misrouted,
            "unrecognised_content": stats.unknown_content,
            "reordered_concurrent_sends": stats.reordered,
            "order_violations": stats.order_violations,
            "receipts": stats.receipts if identified else None,
            "receipts_missing": sum(1 for d, r in zip(stats.delivered, stats.receipted, strict=True)
                                    if d and not r) if identified else None,
            "receipt_duplicates": stats.receipt_duplicates if identified else None,
            "receipt_errors": stats.receipt_errors if identified else None,
        },
        "lost_sample": [
            {"seq": s, "sent_ms_after_window_start": round((stats.send_ns[s] - stats.window_start_ns) / 1e6, 1),
             "pair": pair}
            for s in lost[:20] for pair in [stats.pair_of(s)]
        ],
        "non_200": {str(k): v for k, v in sorted(stats.statuses.items())},
        "non_200_first_body": {str(k): v for k, v in sorted(stats.first_bodies.items())},
        "envelope_errors": dict(stats.envelope_errors),
        "other_server_requests": dict(stats.other_requests),
        "cpu": {
            "server_seconds": round(cpu["server_cpu"], 3),
            "server_cores": round(cpu["server_cpu"] / wall, 3),
            "server_seconds_per_1000_delivered": round(1000 * cpu["server_cpu"] / arrivals, 4) if arrivals else None,
            "postgres_seconds": round(cpu["postgres_cpu"], 3) if cpu["postgres_cpu"] >= 0 else None,
            "postgres_seconds_per_1000_delivered": (
                round(1000 * cpu["postgres_cpu"] / arrivals, 4) if arrivals and cpu["postgres_cpu"] >= 0 else None),
            "generator_seconds": round(cpu["generator_cpu"], 3),
            "generator_cores": round(cpu["generator_cpu"] / wall, 3),
            "redis_seconds": round(cpu["redis_cpu"], 3) if cpu.get("redis_cpu", -1.0) >= 0 else None,
            "redis_seconds_per_1000_delivered": (
                round(1000 * cpu["redis_cpu"] / arrivals, 4) if arrivals and cpu.get("redis_cpu", -1.0) >= 0 else None),
            "machine_busy_share": round(cpu["machine_busy"], 3),
            "other_cores": round(max(0.0, cpu["machine_busy"] * (os.cpu_count() or 1) - (
                cpu["server_cpu"] + cpu["generator_cpu"] + max(0.0, cpu["postgres_cpu"])
                + max(0.0, cpu.get("redis_cpu", -1.0))) / wall), 2),
            "cores": os.cpu_count(),
        },
        "send_lag_max_ms": round(stats.send_lag_max_ns / 1e6, 2) if args.rate else None,
        "drain_seconds": round(drained, 2),
    }
    return result


def table(r: dict[str, Any]) -> str:
    w, t, c, lat = r["window"], r["total"], r["cpu"], r["window"]["latency_ms"]
    load = f"{r['offered_rate']:g} msg/s offered" if r["offered_rate"] else \
        f"as fast as possible, {r['inflight_per_sender']} outstanding per sender"
    rows: list[tuple[str, Any]] = [
        ("server code", r["code"]),
        ("storage / mode", f"{r['storage']} / {r['mode']}, {r['pairs']} pairs, {load}"),
    ]
    if r.get("redis") or r.get("nodes", 1) > 1:
        share = r["cross_node_share"]
        rows.append(("nodes", f"{r['nodes']} ({'Redis' if r['redis'] else 'no Redis'}; "
                              f"{100 * (share or 0):.0f} % of messages cross nodes)"))
    rows += [
        ("measured window", f"{r['window_seconds']} s"),
        ("sent in window (200)", f"{w['sent']} ({w['sent_200']}), {w['sent_per_second']} msg/s"),
        ("delivered msg/s", w["delivered_per_second"]),
        ("latency p50/p95/p99/max", f"{lat['p50']} / {lat['p95']} / {lat['p99']} / {lat['max']} ms"),
        ("per-pair p50 min / max", f"{w['pair_median_latency_ms']['min']} / {w['pair_median_latency_ms']['max']} ms"),
        ("lost (window / total)", f"{w['lost']} / {t['lost']}"),
        ("sent total (200)", f"{t['sent']} ({t['sent_200']})"),
        ("delivered total", t["delivered"]),
        ("duplicates", t["duplicates"]),
        ("unanswered sends", t["unanswered"]),
        ("non-200 answers", ", ".join(f"{k}: {v}" for k, v in r["non_200"].items()) or "none"),
        ("misrouted / unrecognised", f"{t['misrouted']} / {t['unrecognised_content']}"),
        ("order (violations/concurrent)", f"{t['order_violations']} / {t['reordered_concurrent_sends']}"),
    ]
    if "lost_delivered_after_reconnect" in t:
        rows.append(("lost, still queued", f"{t['lost_delivered_after_reconnect']} (delivered after reconnecting)"))
    if r["mode"] == "identified":
        rows.append(("receipts (missing/dup/bad)",
                     f"{t['receipts']} ({t['receipts_missing']} / {t['receipt_duplicates']} / {t['receipt_errors']})"))
    if "receipts_missing_delivered_after_reconnect" in t:
        rows.append(("receipts missing, queued", f"{t['receipts_missing_delivered_after_reconnect']} "
                                                 "(delivered after reconnecting)"))
    rows += [
        ("server CPU s / 1,000 msgs", c["server_seconds_per_1000_delivered"]),
        ("server CPU (cores)", f"{c['server_seconds']} s ({c['server_cores']} of {c['cores']})"
                               + (f", summed over {r['nodes']} nodes" if r.get("nodes", 1) > 1 else "")),
    ]
    if c["postgres_seconds"] is not None and r["storage"] == "postgresql":
        rows.append(("postgres CPU s / 1,000 msgs",
                     f"{c['postgres_seconds_per_1000_delivered']} ({c['postgres_seconds']} s)"))
    if c.get("redis_seconds") is not None:
        rows.append(("redis CPU s / 1,000 msgs", f"{c['redis_seconds_per_1000_delivered']} ({c['redis_seconds']} s)"))
    rows += [
        ("generator CPU (cores)", f"{c['generator_seconds']} s ({c['generator_cores']} of {c['cores']})"),
        ("machine busy", f"{c['machine_busy_share'] * 100:.0f} % of {c['cores']} cores "
                         f"(other processes: {c['other_cores']} cores)"),
    ]
    if r["send_lag_max_ms"] is not None:
        rows.append(("max send lag (generator)", f"{r['send_lag_max_ms']} ms"))
    lines = [f"{name:<28} {value}" for name, value in rows]
    for status, body in r["non_200_first_body"].items():
        lines.append(f"  first {status} body: {body}")
    for what, count in r["envelope_errors"].items():
        lines.append(f"  envelope problem x{count}: {what}")
    for what, count in r["other_server_requests"].items():
        lines.append(f"  other server request x{count}: {what}")
    return "\n".join(lines)


def code_version() -> str:
    """The commit the server runs from, with "+dirty" when src/ has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],  # noqa: S603, S607
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "src"],  # noqa: S603, S607
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def server_log_problems(path: Path, limit: int = 5) -> list[str]:
    problems = []
    with contextlib.suppress(OSError), path.open() as f:
        for line in f:
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line:
                problems.append(line.strip()[:400])
    return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])


def run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="total offered messages/s spread over the pairs; 0 = as fast as possible")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="load before the window (default 2)")
    parser.add_argument("--drain", type=float, default=5.0, help="max wait for stragglers after sending (default 5)")
    parser.add_argument("--pairs", type=int, default=50, help="sender/receiver pairs (default 50)")
    parser.add_argument("--inflight", type=int, default=32,
                        help="with --rate 0: outstanding sends per sender socket (default 32)")
    parser.add_argument("--mode", choices=["identified", "sealed", "group"], default="identified",
                        help="group: one multi-recipient send to N members, timed to the last arrival "
                             "(bench/groups.py; --group-sizes, --sends)")
    parser.add_argument("--group-sizes", default="100,1000", help="group mode: member counts (default 100,1000)")
    parser.add_argument("--sends", type=int, default=5, help="group mode: measured sends per size (default 5)")
    parser.add_argument("--storage-url", help="a postgresql:// URL instead of the embedded SQLite database")
    parser.add_argument("--redis-url", help="cluster mode: the nodes share presence and rate limits through this Redis")
    parser.add_argument("--nodes", type=int, default=1,
                        help="server processes (default 1); more than 1 needs --storage-url and --redis-url")
    parser.add_argument("--deflate", action="store_true", help="negotiate permessage-deflate on the sockets")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="the server's per-request log (default on, as deployed)")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the server with py-spy during the window (collapsed stacks to FILE)")
    parser.add_argument("--samples", metavar="FILE", help="write one CSV line per message (times, latency)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, log, db)")
    args = parser.parse_args()
    if args.mode == "group":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.groups import run_group_bench

        return run_group_bench(args.group_sizes, args.sends, 1, args.storage_url, args.json)
    if not 1 <= args.pairs <= 4999:
        parser.error("--pairs must be 1..4999")
    if args.rate < 0 or args.seconds <= 0 or args.inflight < 1:
        parser.error("--rate must be >= 0, --seconds > 0, --inflight >= 1")
    if not 1 <= args.nodes <= 16:
        parser.error("--nodes must be 1..16")
    if args.nodes > 1 and not (args.storage_url and args.redis_url):
        parser.error("--nodes above 1 needs --storage-url (PostgreSQL) and --redis-url")

    directory = Path(tempfile.mkdtemp(prefix="mailslot-bench-delivery-"))
    schema = None
    if args.storage_url:
        schema = f"mailslot_bench_{secrets.token_hex(4)}"
        asyncio.run(pg_schema(args.storage_url, True, schema))
    key_prefix = f"mailslot-bench-{secrets.token_hex(4)}" if args.redis_url else None
    procs: list[subprocess.Popen[str]] = []
    try:
        config = write_config(directory, 2 * args.pairs, args.storage_url, schema, args.access_log,
                              args.redis_url, key_prefix)
        started = start_nodes(config, directory, args.nodes)
        procs = [proc for proc, _ in started]
        base_urls = [f"http://{ready['host']}:{ready['port']}" for _, ready in started]
        for i, (proc, _) in enumerate(started):
            log(f"server {base_urls[i]} (pid {proc.pid})")
        log(f"storage {'PostgreSQL schema ' + schema if schema else 'SQLite (embedded default)'}"
            + (f", Redis {args.redis_url} prefix {key_prefix}, {args.nodes} node(s)" if args.redis_url else ""))
        result = run(bench(args, base_urls, [proc.pid for proc in procs]))
        result["server_log_problems"] = [
            problem for path in node_logs(directory, args.nodes) for problem in server_log_problems(path)]
        if args.profile:
            result["profile"] = profile_summary(args.profile)
        if args.json:
            print(json.dumps(result))
        else:
            print(table(result))
            for line in result["server_log_problems"]:
                print(f"  server log: {line}")
            for line in result.get("profile", []):
                print(line)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            stop_server(proc)
        if args.redis_url and key_prefix:
            asyncio.run(redis_cleanup(args.redis_url, key_prefix))
        if schema and args.storage_url:
            asyncio.run(pg_schema(args.storage_url, False, schema))
        if args.keep:
            log(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
