"""The blob store contract, run against the local directory and an S3-compatible server (moto)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailslot.backends.blobs.local import LocalBlobStore
from mailslot.backends.blobs.s3 import S3BlobStore
from mailslot.stores.blobs import BlobStore, OffsetMismatch, UploadTooLong
from tests.backends.blob_support import moto_endpoint  # noqa: F401

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    endpoint = request.getfixturevalue("moto_endpoint")
    s3 = S3BlobStore(f"b-{secrets.token_hex(4)}", endpoint=endpoint, access_key="testing", secret_key="testing",
                     part_bytes=5 * MiB)
    await s3.ensure_bucket()
    yield s3
    await s3.close()


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in it])


async def test_put_stat_read_ranges_delete(store: BlobStore) -> None:
    data = os.urandom(300_000)
    assert await store.put("attachments/abc", chunks_of(data)) == len(data)
    info = await store.stat("attachments/abc")
    assert info is not None and info.size == len(data)
    assert await collect(store.read("attachments/abc")) == data
    assert await collect(store.read("attachments/abc", 10, 20)) == data[10:20]
    assert await collect(store.read("attachments/abc", 299_990)) == data[299_990:]
    assert await collect(store.read("attachments/abc", 5, 5)) == b""
    await store.delete("attachments/abc")
    assert await store.stat("attachments/abc") is None
    await store.delete("attachments/abc")  # deleting twice is fine


async def test_large_put_uses_parts(store: BlobStore) -> None:
    data = os.urandom(11 * MiB + 17)
    assert await store.put("profiles/big", chunks_of(data, MiB)) == len(data)
    assert hashlib.sha256(await collect(store.read("profiles/big"))).digest() == hashlib.sha256(data).digest()


async def test_list_by_prefix(store: BlobStore) -> None:
    await store.put("attachments/a1", chunks_of(b"x"))
    await store.put("attachments/a2", chunks_of(b"yy"))
    await store.put("profiles/p1", chunks_of(b"zzz"))
    found = {info.key: info.size async for info in store.objects("attachments/")}
    assert found == {"attachments/a1": 1, "attachments/a2": 2}


async def test_bad_keys_are_refused(store: BlobStore) -> None:
    for key in ("../etc/passwd", "a/b/c", "", "a/.."):
        with pytest.raises(ValueError):
            await store.stat(key)


async def test_resumable_upload_with_cut_and_resume(store: BlobStore) -> None:
    data = os.urandom(12 * MiB + 5)
    await store.begin_upload("attachments/up", len(data))
    state = await store.upload_state("attachments/up")
    assert state is not None and state.offset == 0 and state.length == len(data)

    async def cut(payload: bytes, after: int) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in chunks_of(payload):
            yield chunk
            sent += len(chunk)
            if sent >= after:
                raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        await store.append("attachments/up", 0, cut(data, 7 * MiB + 3000))
    state = await store.upload_state("attachments/up")
    assert state is not None and 0 < state.offset <= len(data)
    offset = state.offset
    with pytest.raises(OffsetMismatch) as mismatch:
        await store.append("attachments/up", offset + 1, chunks_of(b"x"))
    assert mismatch.value.offset == offset
    # a small append in between (smaller than a part) and then the rest
    offset = await store.append("attachments/up", offset, chunks_of(data[offset:offset + 1000]))
    assert offset == (await store.upload_state("attachments/up")).offset  # type: ignore[union-attr]
    assert await store.append("attachments/up", offset, chunks_of(data[offset:])) == len(data)
    assert await store.stat("attachments/up") is None  # not published before finish
    await store.finish_upload("attachments/up")
    assert await store.upload_state("attachments/up") is None
    assert await collect(store.read("attachments/up")) == data
    assert [u async for u in store.list_uploads()] == []


async def test_append_beyond_length_keeps_what_fits(store: BlobStore) -> None:
    await store.begin_upload("attachments/short", 10)
    with pytest.raises(UploadTooLong):
        await store.append("attachments/short", 0, chunks_of(b"0123456789abc"))
    state = await store.upload_state("attachments/short")
    assert state is not None and state.offset == 10
    await store.finish_upload("attachments/short")
    assert await collect(store.read("attachments/short")) == b"0123456789"


async def test_abort_and_list_uploads(store: BlobStore) -> None:
    await store.begin_upload("attachments/u1", 100)
    await store.begin_upload("attachments/u2", 100)
    await store.append("attachments/u1", 0, chunks_of(b"abc"))
    assert sorted([u.key async for u in store.list_uploads()]) == ["attachments/u1", "attachments/u2"]
    await store.abort_upload("attachments/u1")
    assert await store.upload_state("attachments/u1") is None
    assert [u.key async for u in store.list_uploads()] == ["attachments/u2"]
    with pytest.raises(LookupError):
        await store.append("attachments/u1", 0, chunks_of(b"x"))


async def test_small_upload_finishes_as_one_object(store: BlobStore) -> None:
    await store.begin_upload("profiles/tiny", 3)
    await store.append("profiles/tiny", 0, chunks_of(b"abc"))
    await store.finish_upload("profiles/tiny")
    assert await collect(store.read("profiles/tiny")) == b"abc"
