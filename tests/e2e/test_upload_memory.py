"""The real ``mailslot serve`` process takes a 100 MiB attachment over tus: cut off mid-way, resumed
from the offset HEAD reports, downloaded byte-identical — and its resident memory stays within
64 MiB of where it started (a resource bound, sampled from /proc/<pid>/status while bytes flow)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import register

MiB = 1024 * 1024
SIZE = 100 * MiB
CUT_AT = 40 * MiB
NUMBER = "+15555550090"

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    config = tmp_path / "mailslot.toml"
    config.write_text(
        f'[server]\nport = 0\n[storage]\nurl = "sqlite:///{tmp_path}/db.sqlite"\ndata_dir = "{tmp_path}/data"\n'
        f'[registration]\ntest_numbers = {{"{NUMBER}" = "123456"}}\n[logging]\naccess_log = false\n'
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mailslot", "serve", "--config", str(config)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    ready: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.startswith("READY "):
            ready = json.loads(line[len("READY "):])
            break
    assert ready is not None, "no READY line"
    try:
        yield proc, f"http://127.0.0.1:{ready['port']}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def _patch_headers(upload: dict[str, Any], offset: int, length: int) -> dict[str, str]:
    return {"Authorization": upload["headers"]["Authorization"], "Tus-Resumable": "1.0.0",
            "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(length)}


def _cut_off_patch(port: int, key: str, headers: dict[str, str], data: memoryview) -> None:
    """Send the headers and the first CUT_AT bytes of a PATCH for the whole file, then drop the connection."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"PATCH /attachments/{key} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    for start in range(0, CUT_AT, MiB):
        sock.sendall(data[start:start + MiB])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, like a lost link
    sock.close()


def _chunks(data: memoryview, start: int) -> Iterator[bytes]:
    for offset in range(start, len(data), MiB):
        yield bytes(data[offset:offset + MiB])


def test_100_mib_upload_cut_resumed_and_memory_bounded(server: tuple[subprocess.Popen[str], str]) -> None:
    proc, base = server
    port = int(base.rsplit(":", 1)[1])
    data = memoryview(os.urandom(SIZE))
    expected = hashlib.sha256(data).hexdigest()
    with httpx.Client(base_url=base, timeout=60) as client:
        account = register(client, NUMBER)  # type: ignore[arg-type]
        # warm up every code path once with a small upload, then take the baseline
        small = client.get("/v4/attachments/form/upload?uploadLength=10", headers=account.auth).json()
        client.post("/attachments", headers={**small["headers"], "Tus-Resumable": "1.0.0", "Upload-Length": "10"})
        client.patch(f"/attachments/{small['key']}", content=b"0123456789", headers=_patch_headers(small, 0, 10))
        baseline = rss_bytes(proc.pid)

        upload = client.get(f"/v4/attachments/form/upload?uploadLength={SIZE}", headers=account.auth).json()
        created = client.post("/attachments", headers={**upload["headers"], "Tus-Resumable": "1.0.0",
                                                         "Upload-Length": str(SIZE)})
        assert created.status_code == 201, created.text
        key = upload["key"]
        with RssSampler(proc.pid) as sampler:
            _cut_off_patch(port, key, _patch_headers(upload, 0, SIZE), data)
            # the server keeps what arrived; wait until the offset settles
            offset, previous = -1, -2
            while offset != previous:
                time.sleep(0.3)
                previous = offset
                head = client.head(f"/attachments/{key}", headers={"Authorization": upload["headers"]["Authorization"],
                                                                   "Tus-Resumable": "1.0.0"})
                assert head.status_code == 200, head.text
                offset = int(head.headers["Upload-Offset"])
            assert 0 < offset <= CUT_AT < SIZE
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("PATCH", f"/attachments/{key}", body=_chunks(data, offset),
                         headers=_patch_headers(upload, offset, SIZE - offset))
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 204 and answer.getheader("Upload-Offset") == str(SIZE)
            conn.close()
            # download it (streamed and hashed as it comes)
            digest = hashlib.sha256()
            with client.stream("GET", f"/attachments/{key}") as response:
                assert response.status_code == 200
                for chunk in response.iter_bytes(MiB):
                    digest.update(chunk)
        assert digest.hexdigest() == expected
    growth = sampler.peak - baseline
    print(f"RSS baseline {baseline / MiB:.1f} MiB, peak {sampler.peak / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB")
    assert growth <= 64 * MiB, f"resident memory grew by {growth / MiB:.1f} MiB"
