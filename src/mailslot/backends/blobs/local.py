"""Blobs in a local directory: ``objects/<area>/<name>`` and ``uploads/<area>+<name>.{part,meta}``.

Appends go to the ``.part`` file in buffered writes on a worker thread; a finished upload is fsynced
and renamed into ``objects`` (atomic on one file system), so a reader never sees half an object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import BinaryIO

from mailslot.stores.blobs import BlobInfo, OffsetMismatch, UploadState, UploadTooLong, valid_key

WRITE_BUFFER = 1024 * 1024
READ_CHUNK = 256 * 1024


class KeyLocks:
    """One asyncio lock per key (appends to one upload are serialised), dropped when unused."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _check(key: str) -> str:
    if not valid_key(key):
        raise ValueError("invalid blob key")
    return key


class LocalBlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.object_dir = self.root / "objects"
        self.uploads = self.root / "uploads"
        self.object_dir.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._locks = KeyLocks()

    def _object(self, key: str) -> Path:
        return self.object_dir / _check(key)

    def _part(self, key: str) -> Path:
        return self.uploads / (_check(key).replace("/", "+") + ".part")

    def _meta(self, key: str) -> Path:
        return self.uploads / (_check(key).replace("/", "+") + ".meta")

    # -- whole objects ------------------------------------------------------------------------
    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        target = self._object(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        size = 0
        try:
            with await asyncio.to_thread(open, temp, "wb") as handle:
                buffer = bytearray()
                async for chunk in chunks:
                    buffer += chunk
                    size += len(chunk)
                    if len(buffer) >= WRITE_BUFFER:
                        await asyncio.to_thread(handle.write, buffer)  # not mutated until written
                        buffer.clear()
                handle.write(buffer)
                await asyncio.to_thread(_sync, handle)
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return size

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            st = self._object(key).stat()
        except FileNotFoundError:
            return None
        return BlobInfo(key, st.st_size, int(st.st_mtime))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        with await asyncio.to_thread(open, self._object(key), "rb") as handle:
            handle.seek(start)
            remaining = None if end is None else max(0, end - start)
            while remaining is None or remaining > 0:
                size = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                data = await asyncio.to_thread(handle.read, size)
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data

    async def delete(self, key: str) -> None:
        self._object(key).unlink(missing_ok=True)

    async def objects(self, prefix: str) -> AsyncIterator[BlobInfo]:
        found = await asyncio.to_thread(self._scan, prefix)
        for info in found:
            yield info

    def _scan(self, prefix: str) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        for directory, _, files in os.walk(self.object_dir):
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(directory) / name
                key = path.relative_to(self.object_dir).as_posix()
                if key.startswith(prefix):
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue
                    found.append(BlobInfo(key, st.st_size, int(st.st_mtime)))
        return found

    # -- resumable uploads ----------------------------------------------------------------------
    async def begin_upload(self, key: str, length: int) -> None:
        async with self._locks.hold(key):
            self._part(key).write_bytes(b"")
            self._meta(key).write_text(json.dumps({"key": key, "length": length, "started": int(time.time())}))

    def _state(self, key: str) -> UploadState | None:
        try:
            meta = json.loads(self._meta(key).read_text())
            offset = self._part(key).stat().st_size
        except (FileNotFoundError, ValueError):
            return None
        return UploadState(key, int(meta["length"]), offset, int(meta["started"]))

    async def upload_state(self, key: str) -> UploadState | None:
        return self._state(key)

    async def append(self, key: str, offset: int, chunks: AsyncIterable[bytes]) -> int:
        async with self._locks.hold(key):
            state = self._state(key)
            if state is None:
                raise LookupError(key)
            if state.offset != offset:
                raise OffsetMismatch(state.offset)
            room = state.length - offset
            with await asyncio.to_thread(open, self._part(key), "ab") as handle:
                buffer = bytearray()
                try:
                    async for chunk in chunks:
                        if len(chunk) > room:
                            buffer += chunk[:room]
                            room = 0
                            raise UploadTooLong
                        buffer += chunk
                        room -= len(chunk)
                        if len(buffer) >= WRITE_BUFFER:
                            await asyncio.to_thread(handle.write, buffer)  # not mutated until written
                            buffer.clear()
                finally:
                    # Whatever arrived is kept, also when the connection broke off: the client resumes.
                    handle.write(buffer)
                    handle.flush()
            return state.length - room

    async def finish_upload(self, key: str) -> None:
        async with self._locks.hold(key):
            part = self._part(key)
            with await asyncio.to_thread(open, part, "rb+") as handle:
                await asyncio.to_thread(_sync, handle)
            target = self._object(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, target)
            self._meta(key).unlink(missing_ok=True)

    async def abort_upload(self, key: str) -> None:
        async with self._locks.hold(key):
            self._part(key).unlink(missing_ok=True)
            self._meta(key).unlink(missing_ok=True)

    async def list_uploads(self) -> AsyncIterator[UploadState]:
        for meta in sorted(self.uploads.glob("*.meta")):
            try:
                key = json.loads(meta.read_text())["key"]
            except (FileNotFoundError, ValueError, KeyError):
                continue
            state = self._state(key)
            if state is not None:
                yield state

    async def close(self) -> None:
        return None


def _sync(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
