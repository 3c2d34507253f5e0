"""Micro-benchmark: attachment upload (tus PATCH) and download throughput on loopback (not a test).

Starts ``mailslot serve`` as a subprocess (SQLite and the local blob store in a temporary directory,
or ``--s3-endpoint`` for an S3-compatible store), registers one account, and for each stream count
uploads ``--mib`` MiB per stream through the built-in tus endpoint (one PATCH per stream, sent in
1 MiB writes with ``http.client`` from threads), then downloads every attachment again. Reports MB/s
(10^6 bytes per second) over the wall time of all streams together. Client and server share the
machine's cores, so these are lower bounds of what the server does with a remote client.

    .venv/bin/python bench/media.py                       # 1 and 8 streams, 256 MiB in total each
    .venv/bin/python bench/media.py --streams 1 4 8 --mib 64
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.prekeys import CODE, Account, number, register, start_server, stop_server

MiB = 1024 * 1024


def write_config(directory: Path, args: argparse.Namespace) -> Path:
    media = f"[media]\nmax_attachment_bytes = {args.total_mib * MiB}\n"
    if args.s3_endpoint:
        media += (f'backend = "s3"\ns3_endpoint = "{args.s3_endpoint}"\ns3_bucket = "{args.s3_bucket}"\n'
                  f's3_access_key = "{args.s3_access_key}"\ns3_secret_key = "{args.s3_secret_key}"\n')
    config = directory / "mailslot.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\n'
        f'[storage]\nurl = "sqlite:///{directory}/mailslot.db"\ndata_dir = "{directory}/data"\n'
        f'[registration]\nsms_provider = "console"\n[registration.test_numbers]\n"{number(0)}" = "{CODE}"\n'
        "[logging]\naccess_log = false\n"
        "[rate_limits.attachmentCreate]\ncapacity = 1000000\npermit_seconds = 0.000001\n"
        "[rate_limits.attachmentCreateBytes]\ncapacity = 1000000000000\npermit_seconds = 0.000000001\n"
        + media
    )
    return config


def upload(port: int, form: dict[str, Any], payload: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    tus = {"Authorization": form["headers"]["Authorization"], "Tus-Resumable": "1.0.0"}
    conn.request("POST", "/attachments", headers={**tus, "Upload-Length": str(len(payload)),
                                                   "Upload-Metadata": form["headers"]["Upload-Metadata"]})
    created = conn.getresponse()
    created.read()
    assert created.status == 201, created.status
    view = memoryview(payload)
    conn.putrequest("PATCH", f"/attachments/{form['key']}")
    for name, value in {**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
                        "Content-Length": str(len(payload))}.items():
        conn.putheader(name, value)
    conn.endheaders()
    for start in range(0, len(payload), MiB):
        conn.send(view[start:start + MiB])
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 204, answer.status
    conn.close()


def download(port: int, key: str, size: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", f"/attachments/{key}")
    response = conn.getresponse()
    received = 0
    while chunk := response.read(MiB):
        received += len(chunk)
    assert response.status == 200 and received == size, (response.status, received)
    conn.close()


def parallel(target: Any, argsets: list[tuple[Any, ...]]) -> float:
    threads = [threading.Thread(target=target, args=a) for a in argsets]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


async def setup(base_url: str) -> Account:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        return await register(http, number(0))


def forms(base_url: str, account: Account, count: int, size: int) -> list[dict[str, Any]]:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        result = []
        for _ in range(count):
            response = http.get(f"/v4/attachments/form/upload?uploadLength={size}", headers=account.auth)
            response.raise_for_status()
            result.append(dict(response.json()))
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--total-mib", type=int, default=256, help="bytes moved per run, split over the streams")
    parser.add_argument("--s3-endpoint", default="")
    parser.add_argument("--s3-bucket", default="mailslot-bench")
    parser.add_argument("--s3-access-key", default="testing")
    parser.add_argument("--s3-secret-key", default="testing")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="mailslot-media-bench-"))
    proc = None
    try:
        proc, ready = start_server(write_config(directory, args), directory)
        port = int(ready["port"])
        base_url = f"http://127.0.0.1:{port}"
        account = asyncio.run(setup(base_url))
        print(f"{'streams':>7} {'MiB/stream':>10} {'upload MB/s':>12} {'download MB/s':>14}")
        for streams in args.streams:
            size = args.total_mib * MiB // streams
            payload = os.urandom(size)
            batch = forms(base_url, account, streams, size)
            up = parallel(upload, [(port, form, payload) for form in batch])
            down = parallel(download, [(port, form["key"], size) for form in batch])
            total = size * streams
            print(f"{streams:>7} {size / MiB:>10.0f} {total / up / 1e6:>12.0f} {total / down / 1e6:>14.0f}")
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
