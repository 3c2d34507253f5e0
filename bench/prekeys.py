"""Micro-benchmark: pre-key bundle fetches per second (not a test).

Starts ``mailslot serve`` as a subprocess on the embedded default (SQLite in a temporary directory),
registers accounts over HTTP, uploads 100 one-time EC and 100 one-time Kyber keys per account (the
most one upload may carry), then fetches bundles over HTTP with httpx for a fixed time at each
concurrency level. The pools are refilled before each run, so every measured fetch consumes one EC and
one KEM one-time key (a write) unless the run outlasts the stock, which the table reports.

Fetches are anonymous with the target's Unidentified-Access-Key (as sealed-sender clients do; these
are not rate limited) or, with ``--auth``, authenticated, for which the config raises the ``prekeys``
limit that would otherwise allow 6 fetches per 10 minutes.

    .venv/bin/python bench/prekeys.py                       # anonymous, concurrency 1 and 32, 5 s each
    .venv/bin/python bench/prekeys.py --auth --seconds 10
    .venv/bin/python bench/prekeys.py --storage-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mailslot.crypto import xeddsa

KEYS_PER_UPLOAD = 100
CODE = "123456"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + b64(f"{user}:{password}".encode())}


def number(i: int) -> str:
    return f"+1555555{i:04d}"


@dataclass
class Account:
    aci: str
    password: str
    uak: bytes
    identity_private: bytes
    next_key_id: int = 1

    @property
    def auth(self) -> dict[str, str]:
        return basic(f"{self.aci}.1", self.password)


def signed(private: bytes, key_id: int, public: bytes) -> dict[str, Any]:
    return {"keyId": key_id, "publicKey": b64(public), "signature": b64(xeddsa.sign(private, public))}


def kem_public() -> bytes:
    return b"\x08" + os.urandom(1568)


# -- the server ----------------------------------------------------------------------------------


def write_config(directory: Path, accounts: int, storage_url: str | None, schema: str | None) -> Path:
    url = storage_url or f"sqlite:///{directory}/mailslot.db"
    numbers = "\n".join(f'"{number(i)}" = "{CODE}"' for i in range(accounts + 1))
    config = directory / "mailslot.toml"
    config.write_text(
        "[server]\nhost = \"127.0.0.1\"\nport = 0\n"
        f"[storage]\nurl = \"{url}\"\ndata_dir = \"{directory}/data\"\n"
        + (f"schema = \"{schema}\"\n" if schema else "")
        + "[registration]\nsms_provider = \"console\"\n[registration.test_numbers]\n" + numbers + "\n"
        # Setting up many accounts from one address, and (with --auth) fetching without the limit.
        "[rate_limits.verificationSessionPerIp]\ncapacity = 1000000\npermit_seconds = 0.000001\n"
        "[rate_limits.prekeys]\ncapacity = 1000000000\npermit_seconds = 0.000001\n"
    )
    return config


def start_server(config: Path, directory: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    script = Path(sys.executable).with_name("mailslot")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mailslot"]
    log = (directory / "server.log").open("w")
    proc = subprocess.Popen(  # noqa: S603 - our own server binary and a config we wrote
        [*command, "serve", "--port", "0", "--config", str(config)], cwd=directory,
        stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
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
            raise SystemExit(f"the server did not start; see {directory / 'server.log'}")
        time.sleep(0.05)
    return proc, found


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


async def pg_schema(url: str, create: bool, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("postgresql://", "postgres://"))
    try:
        await conn.execute(f"CREATE SCHEMA {schema}" if create else f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


# -- setup over HTTP -----------------------------------------------------------------------------


async def register(http: httpx.AsyncClient, phone: str) -> Account:
    response = await http.post("/v1/verification/session", json={"number": phone})
    response.raise_for_status()
    session_id = response.json()["id"]
    (await http.post(f"/v1/verification/session/{session_id}/code",
                     json={"transport": "sms", "client": "bench"})).raise_for_status()
    (await http.put(f"/v1/verification/session/{session_id}/code", json={"code": CODE})).raise_for_status()
    aci_private, aci_public = xeddsa.generate_keypair()
    pni_private, pni_public = xeddsa.generate_keypair()
    uak, password = secrets.token_bytes(16), secrets.token_urlsafe(18)
    body = {
        "sessionId": session_id,
        "accountAttributes": {"fetchesMessages": True, "registrationId": 1234, "pniRegistrationId": 4321,
                              "capabilities": {"spqr": True}, "unidentifiedAccessKey": b64(uak),
                              "unrestrictedUnidentifiedAccess": False},
        "skipDeviceTransfer": True,
        "aciIdentityKey": b64(aci_public),
        "pniIdentityKey": b64(pni_public),
        "aciSignedPreKey": signed(aci_private, 1, xeddsa.generate_keypair()[1]),
        "pniSignedPreKey": signed(pni_private, 2, xeddsa.generate_keypair()[1]),
        "aciPqLastResortPreKey": signed(aci_private, 3, kem_public()),
        "pniPqLastResortPreKey": signed(pni_private, 4, kem_public()),
    }
    response = await http.post("/v1/registration", json=body, headers=basic(phone, password))
    response.raise_for_status()
    return Account(response.json()["uuid"], password, uak, aci_private, next_key_id=10)


def key_batch(account: Account) -> dict[str, Any]:
    first = account.next_key_id
    account.next_key_id += KEYS_PER_UPLOAD
    ids = range(first, first + KEYS_PER_UPLOAD)
    return {
        "preKeys": [{"keyId": i, "publicKey": b64(xeddsa.generate_keypair()[1])} for i in ids],
        "pqPreKeys": [signed(account.identity_private, i, kem_public()) for i in ids],
    }


async def refill(http: httpx.AsyncClient, accounts: list[Account]) -> int:
    """Upload a fresh batch of 100 + 100 keys per account (a non-empty list replaces the pool)."""
    batches = [key_batch(a) for a in accounts]  # signing is CPU work: done before the requests
    for account, batch in zip(accounts, batches, strict=True):
        response = await http.put("/v2/keys", json=batch, headers=account.auth)
        assert response.status_code == 204, response.text
    return len(accounts) * KEYS_PER_UPLOAD


# -- measurement ---------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    without_one_time_key: int = 0
    handed_out: set[tuple[str, int]] = field(default_factory=set)
    duplicates: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


async def measure(base_url: str, accounts: list[Account], caller: Account | None, concurrency: int,
                  seconds: float) -> Run:
    run = Run("auth" if caller else "anonymous", concurrency, seconds)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    counter = iter(range(10**12))
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as http:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                target = accounts[next(counter) % len(accounts)]
                headers = caller.auth if caller else {"Unidentified-Access-Key": b64(target.uak)}
                started = time.perf_counter()
                response = await http.get(f"/v2/keys/{target.aci}/1", headers=headers)
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    run.errors += 1
                    continue
                run.latencies.append(elapsed)
                pre_key = response.json()["devices"][0]["preKey"]
                if pre_key is None:
                    run.without_one_time_key += 1
                else:
                    handed = (target.aci, pre_key["keyId"])
                    run.duplicates += handed in run.handed_out
                    run.handed_out.add(handed)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - started
    return run


def table(runs: list[Run], stock: int) -> str:
    header = (f"{'mode':<10} {'conc':>4} {'fetches':>8} {'fetch/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'no 1-time key':>13} {'dupes':>5} {'errors':>6}")
    lines = [header, "-" * len(header)]
    for run in runs:
        ordered = sorted(run.latencies) or [0.0]
        p50 = statistics.median(ordered) * 1000
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        lines.append(f"{run.mode:<10} {run.concurrency:>4} {len(run.latencies):>8} {run.rate:>9.1f} {p50:>8.2f} "
                     f"{p99:>8.2f} {run.without_one_time_key:>13} {run.duplicates:>5} {run.errors:>6}")
    lines.append(f"(one-time EC + KEM keys in stock at the start of each run: {stock} each)")
    return "\n".join(lines)


async def bench(args: argparse.Namespace, base_url: str) -> list[Run]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        setup_started = time.perf_counter()
        accounts = await asyncio.gather(*(register(http, number(i)) for i in range(1, args.accounts + 1)))
        caller = await register(http, number(0)) if args.auth else None
        print(f"registered {len(accounts)} accounts in {time.perf_counter() - setup_started:.1f} s", flush=True)
        runs = []
        for concurrency in args.concurrency:
            stock = await refill(http, list(accounts))
            print(f"uploaded {stock} + {stock} one-time keys in batches of {KEYS_PER_UPLOAD}; "
                  f"measuring concurrency {concurrency} for {args.seconds} s", flush=True)
            runs.append(await measure(base_url, list(accounts), caller, concurrency, args.seconds))
    print()
    print(table(runs, stock))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 32],
                        help="comma-separated concurrency levels (default 1,32)")
    parser.add_argument("--accounts", type=int, default=60,
                        help="target accounts, each holding 100 one-time EC + 100 KEM keys (default 60)")
    parser.add_argument("--auth", action="store_true", help="authenticated fetches instead of anonymous ones")
    parser.add_argument("--storage-url", help="a postgresql:// URL instead of the embedded SQLite database")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, log, db)")
    args = parser.parse_args()
    if not 1 <= args.accounts <= 9999:
        parser.error("--accounts must be 1..9999")

    directory = Path(tempfile.mkdtemp(prefix="mailslot-bench-"))
    schema = None
    if args.storage_url:
        schema = f"mailslot_bench_{secrets.token_hex(4)}"
        asyncio.run(pg_schema(args.storage_url, True, schema))
    proc = None
    try:
        config = write_config(directory, args.accounts, args.storage_url, schema)
        proc, ready = start_server(config, directory)
        base_url = f"http://{ready['host']}:{ready['port']}"
        storage = "PostgreSQL" if args.storage_url else "SQLite (embedded default)"
        print(f"server {base_url}, storage {storage}, trust root {ready['trustRoot']}", flush=True)
        asyncio.run(bench(args, base_url))
    finally:
        if proc is not None:
            stop_server(proc)
        if schema and args.storage_url:
            asyncio.run(pg_schema(args.storage_url, False, schema))
        if args.keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
