"""Blobs in any S3-compatible store, through boto3 calls on worker threads.

Objects are stored under their key. A resumable upload is an S3 multipart upload plus two small
objects: ``_uploads/<key>.json`` (declared length, start time, upload id) and ``_uploads/<key>.tail``
(the bytes after the last full part). Parts are at least ``part_bytes`` (S3 wants ≥ 5 MiB for every
part but the last), so an append holds at most one part in memory; what is left over when an append
ends — also when its connection broke off — becomes the tail, which the next append takes back.
The tail is deleted as soon as it is read: a crash in between loses those bytes, and the offset
reported afterwards is lower, which a resuming client simply re-sends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from mailslot.backends.blobs.local import KeyLocks
from mailslot.stores.blobs import BlobInfo, OffsetMismatch, UploadState, UploadTooLong, valid_key

T = TypeVar("T")

MIN_PART = 5 * 1024 * 1024
READ_CHUNK = 256 * 1024
UPLOADS = "_uploads/"


def _missing(exc: ClientError) -> bool:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


def _check(key: str) -> str:
    if not valid_key(key):
        raise ValueError("invalid blob key")
    return key


class S3BlobStore:
    def __init__(
        self,
        bucket: str,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key: str = "",
        secret_key: str = "",
        part_bytes: int = 8 * 1024 * 1024,
        max_connections: int = 32,
    ) -> None:
        self.bucket = bucket
        self.part_bytes = max(MIN_PART, part_bytes)
        self.client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=Config(max_pool_connections=max_connections, retries={"max_attempts": 3},
                          s3={"addressing_style": "path"}),
        )
        self._locks = KeyLocks()

    async def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, Bucket=self.bucket, **kwargs)

    async def ensure_bucket(self) -> None:
        try:
            await self._call(self.client.head_bucket)
        except ClientError:
            await self._call(self.client.create_bucket)

    # -- whole objects ------------------------------------------------------------------------
    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        _check(key)
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        size = 0
        try:
            async for chunk in chunks:
                buffer += chunk
                size += len(chunk)
                if len(buffer) >= self.part_bytes:
                    if upload_id is None:
                        created = await self._call(self.client.create_multipart_upload, Key=key)
                        upload_id = str(created["UploadId"])
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    buffer.clear()
            if upload_id is None:
                await self._call(self.client.put_object, Key=key, Body=bytes(buffer))
                return size
            if buffer:
                parts.append(await self._upload_part(key, upload_id, len(parts) + 1, bytes(buffer)))
            await self._call(self.client.complete_multipart_upload, Key=key, UploadId=upload_id,
                             MultipartUpload={"Parts": parts})
            upload_id = None
            return size
        finally:
            if upload_id is not None:
                await self._call(self.client.abort_multipart_upload, Key=key, UploadId=upload_id)

    async def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        answer = await self._call(self.client.upload_part, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": answer["ETag"]}

    async def stat(self, key: str) -> BlobInfo | None:
        try:
            head = await self._call(self.client.head_object, Key=_check(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return BlobInfo(key, int(head["ContentLength"]), int(head["LastModified"].timestamp()))

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            return
        byte_range = f"bytes={start}-" + ("" if end is None else str(end - 1))
        answer = await self._call(self.client.get_object, Key=_check(key), Range=byte_range)
        body = answer["Body"]
        try:
            while True:
                data = await asyncio.to_thread(body.read, READ_CHUNK)
                if not data:
                    return
                yield data
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await self._call(self.client.delete_object, Key=_check(key))

    async def objects(self, prefix: str) -> AsyncIterator[BlobInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                if not item["Key"].startswith(UPLOADS):
                    yield BlobInfo(item["Key"], int(item["Size"]), int(item["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    # -- resumable uploads ----------------------------------------------------------------------
    async def _get_bytes(self, key: str) -> bytes | None:
        try:
            answer = await self._call(self.client.get_object, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        data: bytes = await asyncio.to_thread(answer["Body"].read)
        return data

    async def _info(self, key: str) -> dict[str, Any] | None:
        raw = await self._get_bytes(UPLOADS + _check(key) + ".json")
        return None if raw is None else dict(json.loads(raw))

    async def _parts(self, key: str, upload_id: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        marker = 0
        while True:
            page = await self._call(self.client.list_parts, Key=key, UploadId=upload_id, PartNumberMarker=marker)
            parts.extend(page.get("Parts", []))
            if not page.get("IsTruncated"):
                return parts
            marker = int(page["NextPartNumberMarker"])

    async def _tail_size(self, key: str) -> int:
        try:
            head = await self._call(self.client.head_object, Key=UPLOADS + key + ".tail")
        except ClientError as exc:
            if _missing(exc):
                return 0
            raise
        return int(head["ContentLength"])

    async def begin_upload(self, key: str, length: int) -> None:
        async with self._locks.hold(key):
            old = await self._info(key)
            if old is not None:
                await self._abort(key, old)
            created = await self._call(self.client.create_multipart_upload, Key=key)
            info = {"key": key, "length": length, "started": int(time.time()), "upload_id": created["UploadId"]}
            await self._call(self.client.put_object, Key=UPLOADS + key + ".json", Body=json.dumps(info).encode())

    async def _state(self, key: str, info: dict[str, Any]) -> tuple[UploadState, list[dict[str, Any]], int]:
        parts = await self._parts(key, str(info["upload_id"]))
        tail = await self._tail_size(key)
        offset = sum(int(p["Size"]) for p in parts) + tail
        return UploadState(key, int(info["length"]), offset, int(info["started"])), parts, tail

    async def upload_state(self, key: str) -> UploadState | None:
        info = await self._info(key)
        if info is None:
            return None
        state, _, _ = await self._state(key, info)
        return state

    async def append(self, key: str, offset: int, chunks: AsyncIterable[bytes]) -> int:
        async with self._locks.hold(key):
            info = await self._info(key)
            if info is None:
                raise LookupError(key)
            state, parts, tail = await self._state(key, info)
            if state.offset != offset:
                raise OffsetMismatch(state.offset)
            upload_id = str(info["upload_id"])
            buffer = bytearray()
            if tail:
                buffer += await self._get_bytes(UPLOADS + key + ".tail") or b""
                await self._call(self.client.delete_object, Key=UPLOADS + key + ".tail")
            number = len(parts) + 1
            room = state.length - offset
            try:
                async for chunk in chunks:
                    if len(chunk) > room:
                        buffer += chunk[:room]
                        room = 0
                        raise UploadTooLong
                    buffer += chunk
                    room -= len(chunk)
                    if len(buffer) >= self.part_bytes:
                        await self._upload_part(key, upload_id, number, bytes(buffer))
                        number += 1
                        buffer.clear()
            finally:
                if buffer:
                    await self._call(self.client.put_object, Key=UPLOADS + key + ".tail", Body=bytes(buffer))
            return state.length - room

    async def finish_upload(self, key: str) -> None:
        async with self._locks.hold(key):
            info = await self._info(key)
            if info is None:
                raise LookupError(key)
            upload_id = str(info["upload_id"])
            parts = [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in await self._parts(key, upload_id)]
            tail = await self._get_bytes(UPLOADS + key + ".tail")
            if not parts:
                await self._call(self.client.put_object, Key=key, Body=tail or b"")
                await self._call(self.client.abort_multipart_upload, Key=key, UploadId=upload_id)
            else:
                if tail:
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, tail))
                await self._call(self.client.complete_multipart_upload, Key=key, UploadId=upload_id,
                                 MultipartUpload={"Parts": parts})
            await self._call(self.client.delete_object, Key=UPLOADS + key + ".tail")
            await self._call(self.client.delete_object, Key=UPLOADS + key + ".json")

    async def _abort(self, key: str, info: dict[str, Any]) -> None:
        try:
            await self._call(self.client.abort_multipart_upload, Key=key, UploadId=str(info["upload_id"]))
        except ClientError as exc:
            if not _missing(exc):
                raise
        await self._call(self.client.delete_object, Key=UPLOADS + key + ".tail")
        await self._call(self.client.delete_object, Key=UPLOADS + key + ".json")

    async def abort_upload(self, key: str) -> None:
        async with self._locks.hold(key):
            info = await self._info(key)
            if info is not None:
                await self._abort(key, info)

    async def list_uploads(self) -> AsyncIterator[UploadState]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": UPLOADS}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._call(self.client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                name = str(item["Key"])
                if name.endswith(".json"):
                    key = name[len(UPLOADS):-len(".json")]
                    yield UploadState(key, 0, 0, int(item["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    async def close(self) -> None:
        await asyncio.to_thread(self.client.close)
