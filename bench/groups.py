"""Group fan-out benchmark: time from one multi-recipient send to the last member's arrival.

Starts `mailslot serve` (embedded SQLite, or PostgreSQL with --storage-url), registers the members,
connects one socket per member (one device each), then for each group size sends a sealed-sender v2
message to the first N members and measures, per send: the sender's 200, the first and the last
member's arrival, and the median. Every member acknowledges what it gets, as a client would.

    .venv/bin/python bench/groups.py --sizes 100,1000 --sends 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.delivery import (
    Account,
    ack_frame,
    log,
    number,
    register,
    start_server,
    stop_server,
)
from mailslot.protocol.envelope_pb2 import Envelope
from mailslot.protocol.websocket_pb2 import WebSocketMessage

CODE = "123456"
MRM = "application/vnd.signal-messenger.mrm"
E_PUB = bytes(range(100, 132))
BODY = b"x" * 160  # a group text message's ciphertext is a few hundred bytes


def write_config(directory: Path, members: int, storage_url: str | None) -> Path:
    url = storage_url or f"sqlite:///{directory}/mailslot.db"
    unlimited = "{ capacity = 1000000, permit_seconds = 0.000001 }"
    numbers = "\n".join(f'"{number(i)}" = "{CODE}"' for i in range(members))
    config = directory / "mailslot.toml"
    config.write_text(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\n"
        f"[storage]\nurl = \"{url}\"\ndata_dir = \"{directory}/data\"\n"
        "[logging]\naccess_log = false\n"
        "[registration]\nsms_provider = \"console\"\n[registration.test_numbers]\n" + numbers + "\n"
        "[rate_limits]\n"
        f"inboundMessageBytes = {unlimited}\nverificationSessionPerIp = {unlimited}\n"
        f"verificationSessionPerNumber = {unlimited}\nregistration = {unlimited}\n"
    )
    return config


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def payload(members: list[Account], send_id: int) -> bytes:
    """A sealed-sender v2 message to ``members`` (device 1 each); the tail carries the send id."""
    out = bytearray([0x23]) + varint(len(members))
    for index, member in enumerate(members):
        out += b"\x00" + bytes.fromhex(member.aci.replace("-", "")) + b"\x01"
        out += member.registration_id.to_bytes(2, "big") + index.to_bytes(4, "big") * 8 + bytes(16)
    return bytes(out) + E_PUB + BODY + struct.pack(">Q", send_id)


def combined_key(members: list[Account]) -> bytes:
    out = bytes(16)
    for member in members:
        out = bytes(a ^ b for a, b in zip(out, member.uak, strict=True))
    return out


class Member:
    def __init__(self, account: Account) -> None:
        self.account = account
        self.ws: ClientConnection | None = None
        self.ready = asyncio.Event()
        self.arrivals: dict[int, int] = {}  # send id → monotonic ns
        self.waiters: dict[int, asyncio.Event] = {}

    async def read(self) -> None:
        assert self.ws is not None
        async for frame in self.ws:
            assert isinstance(frame, bytes)
            message = WebSocketMessage.FromString(frame)
            if message.type != WebSocketMessage.REQUEST:
                continue
            request = message.request
            if request.path == "/api/v1/message":
                now = time.monotonic_ns()
                (send_id,) = struct.unpack(">Q", Envelope.FromString(request.body).content[-8:])
                self.arrivals.setdefault(send_id, now)
                event = self.waiters.get(send_id)
                if event is not None:
                    event.set()
            elif request.path == "/api/v1/queue/empty":
                self.ready.set()
            await self.ws.send(ack_frame(request.id))


async def connect_all(members: list[Member], ws_url: str) -> list[asyncio.Task[None]]:
    semaphore = asyncio.Semaphore(32)

    async def one(member: Member) -> None:
        async with semaphore:
            member.ws = await connect(ws_url, additional_headers={"Authorization": member.account.authorization},
                                      max_size=2**20, ping_interval=None, open_timeout=60, proxy=None)

    await asyncio.gather(*(one(m) for m in members))
    readers = [asyncio.create_task(m.read()) for m in members]
    await asyncio.wait_for(asyncio.gather(*(m.ready.wait() for m in members)), 60)
    return readers


async def register_all(http: httpx.AsyncClient, count: int) -> list[Account]:
    semaphore = asyncio.Semaphore(16)

    async def one(index: int) -> Account:
        async with semaphore:
            return await register(http, number(index))

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def one_send(http: httpx.AsyncClient, members: list[Member], send_id: int) -> dict[str, float]:
    accounts = [m.account for m in members]
    body, key = payload(accounts, send_id), combined_key(accounts)
    for member in members:
        member.waiters[send_id] = asyncio.Event()
    started = time.monotonic_ns()
    headers = {"Content-Type": MRM, "Unidentified-Access-Key": base64.b64encode(key).decode()}
    response = await http.put(f"/v1/messages/multi_recipient?ts={int(time.time() * 1000)}", content=body,
                              headers=headers)
    accepted = time.monotonic_ns()
    if response.status_code != 200:
        raise SystemExit(f"send failed: {response.status_code} {response.text}")
    await asyncio.wait_for(asyncio.gather(*(m.waiters[send_id].wait() for m in members)), 60)
    arrivals = sorted(m.arrivals[send_id] - started for m in members)
    return {
        "accepted_ms": (accepted - started) / 1e6,
        "first_ms": arrivals[0] / 1e6,
        "median_ms": arrivals[len(arrivals) // 2] / 1e6,
        "last_ms": arrivals[-1] / 1e6,
    }


async def bench(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    sizes = sorted(int(s) for s in args.sizes.split(","))
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        log(f"registering {sizes[-1]} members ...")
        accounts = await register_all(http, sizes[-1])
        members = [Member(a) for a in accounts]
        log("connecting their sockets ...")
        readers = await connect_all(members, base_url.replace("http", "ws", 1) + "/v1/websocket/")
        results: dict[str, Any] = {}
        send_id = 0
        try:
            for size in sizes:
                runs = []
                for _ in range(args.warmup + args.sends):
                    send_id += 1
                    runs.append(await one_send(http, members[:size], send_id))
                    await asyncio.sleep(0.2)
                runs = runs[args.warmup:]
                results[str(size)] = {
                    name: {"median": statistics.median(r[name] for r in runs), "max": max(r[name] for r in runs)}
                    for name in runs[0]
                }
                log(f"{size} members: {json.dumps(results[str(size)])}")
        finally:
            for reader in readers:
                reader.cancel()
            for member in members:
                if member.ws is not None:
                    await member.ws.close()
    return results


def run_group_bench(sizes: str, sends: int, warmup: int, storage_url: str | None, as_json: bool) -> int:
    directory = Path(tempfile.mkdtemp(prefix="mailslot-bench-groups-"))
    members = max(int(s) for s in sizes.split(","))
    proc, ready = start_server(write_config(directory, members, storage_url), directory)
    args = argparse.Namespace(sizes=sizes, sends=sends, warmup=warmup)
    try:
        base_url = f"http://{ready['host']}:{ready['port']}"
        results = asyncio.run(bench(args, base_url))
    finally:
        stop_server(proc)
        shutil.rmtree(directory, ignore_errors=True)
    if as_json:
        print(json.dumps(results))
        return 0
    print("| members | sender's 200 ms | first arrival ms | median arrival ms | last arrival ms |")
    print("|---|---|---|---|---|")
    for size, r in results.items():
        print(f"| {size} | {r['accepted_ms']['median']:.1f} | {r['first_ms']['median']:.1f} | "
              f"{r['median_ms']['median']:.1f} | {r['last_ms']['median']:.1f} (max {r['last_ms']['max']:.1f}) |")
    print(f"(median of {sends} sends each; one socket per member, all in this process; "
          f"{os.cpu_count()} cores shared with the server)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="group sizes, comma-separated (default 100,1000)")
    parser.add_argument("--sends", type=int, default=5, help="measured sends per size (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured sends per size first (default 1)")
    parser.add_argument("--storage-url", help="a postgresql:// URL (its database is used as is: use a scratch one)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    return run_group_bench(args.sizes, args.sends, args.warmup, args.storage_url, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
