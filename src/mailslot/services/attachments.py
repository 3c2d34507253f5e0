"""Attachments (digest §9): upload forms for the built-in tus 1.0 endpoint, uploads, downloads, expiry.

Attachments are client-side ciphertext; the server sees only sizes. The tus state (declared length,
bytes received) lives in the blob store, so any node in front of the same store can take a PATCH.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mailslot.config import MediaSettings
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError
from mailslot.services.ratelimit import RateLimiters
from mailslot.services.upload_tokens import UploadGrant, UploadTokens
from mailslot.stores.blobs import BlobInfo, BlobStore, OffsetMismatch, UploadTooLong, valid_key

AREA = "attachments/"
# Group avatars are uploaded like attachments but kept until their group replaces them (then deleted)
# rather than for attachment_expiry_days; one that no group names is purged after upload_expiry_seconds.
GROUP_AVATAR_PREFIX = "g-"
KEY_CHARS = 20  # new_key(): 15 random bytes in base64url


def is_group_avatar(key: str) -> bool:
    """A group avatar's key: the prefix and then a whole key. An attachment's key is 20 characters and
    may itself begin with "g-", so the length is what tells them apart."""
    return key.startswith(GROUP_AVATAR_PREFIX) and len(key) == len(GROUP_AVATAR_PREFIX) + KEY_CHARS
TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,termination,expiration"


def new_key() -> str:
    """base64url of 15 random bytes: 20 characters, no padding (digest §9)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(15)).decode()


def _not_found() -> ServiceError:
    return ServiceError(404, "not_found", "no such upload")


def _unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or invalid upload token",
                        headers={"WWW-Authenticate": 'Bearer realm="attachments"'})


@dataclass(frozen=True, slots=True)
class UploadStatus:
    offset: int
    length: int
    expires: int | None  # epoch seconds; None once finished


class AttachmentService:
    def __init__(self, blobs: BlobStore, limiters: RateLimiters, settings: MediaSettings, tokens: UploadTokens) -> None:
        self.blobs = blobs
        self.limiters = limiters
        self.settings = settings
        self.tokens = tokens

    # -- the form (GET /v4/attachments/form/upload) -------------------------------------------
    async def upload_form(self, principal: Principal, upload_length: int | None, base_url: str) -> dict[str, Any]:
        maximum = self.settings.max_attachment_bytes
        if upload_length is not None and upload_length < 1:
            raise ServiceError(400, "invalid_upload_length", "uploadLength must be at least 1")
        if upload_length is not None and upload_length > maximum:
            raise ServiceError(413, "payload_too_large", f"attachments are limited to {maximum} bytes")
        await self.limiters.check("attachmentCreate", str(principal.aci))
        if upload_length is not None:
            await self.limiters.check("attachmentCreateBytes", str(principal.aci), upload_length)
        return self._form(new_key(), upload_length or maximum, base_url)

    def _form(self, key: str, max_length: int, base_url: str) -> dict[str, Any]:
        """The cdn-3 upload form: the key, an upload token bound to it, and the tus location."""
        token = self.tokens.issue(key, max_length)
        return {
            "cdn": 3,
            "key": key,
            "headers": {
                "Authorization": f"Bearer {token}",
                "Upload-Metadata": "filename " + base64.b64encode(key.encode()).decode(),
            },
            "signedUploadLocation": base_url.rstrip("/") + "/attachments",
        }

    async def group_avatar_form(self, group_id: bytes, base_url: str) -> dict[str, Any]:
        """The same form, for a group's encrypted avatar: authorised by Group-Auth (the caller checked it),
        rate-limited per group, never tied to an account."""
        await self.limiters.check("attachmentCreate", "group:" + group_id.hex())
        return self._form(GROUP_AVATAR_PREFIX + new_key(), self.settings.avatar_max_bytes, base_url)

    async def delete_group_avatar(self, key: str) -> None:
        if is_group_avatar(key) and valid_key(AREA + key):
            await self.blobs.delete(AREA + key)

    async def purge_group_avatars(self, now: int, in_use: Callable[[list[str]], Awaitable[set[str]]]) -> int:
        cutoff = now - self.settings.upload_expiry_seconds
        old = [b.key async for b in self.blobs.objects(AREA + GROUP_AVATAR_PREFIX)
               if b.modified < cutoff and is_group_avatar(b.key.removeprefix(AREA))]
        used = await in_use([key.removeprefix(AREA) for key in old]) if old else set()
        orphans = [key for key in old if key.removeprefix(AREA) not in used]
        for key in orphans:
            await self.blobs.delete(key)
        return len(orphans)

    # -- tus ----------------------------------------------------------------------------------
    def authorize(self, authorization: str | None, key: str | None = None) -> UploadGrant:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized()
        grant = self.tokens.verify(token.strip())
        if grant is None or not valid_key(AREA + grant.key) or (key is not None and key != grant.key):
            raise _unauthorized()
        return grant

    def _expires(self, started: int) -> int:
        return started + self.settings.upload_expiry_seconds

    async def create(self, grant: UploadGrant, length: int, metadata_key: str | None) -> UploadStatus:
        if metadata_key is not None and metadata_key != grant.key:
            raise ServiceError(403, "key_mismatch", "the upload metadata names another key than the token")
        if length < 1:
            raise ServiceError(400, "invalid_upload_length", "Upload-Length must be at least 1")
        if length > min(grant.max_length, self.settings.max_attachment_bytes):
            raise ServiceError(413, "payload_too_large", "Upload-Length exceeds what this upload may hold")
        if await self.blobs.stat(AREA + grant.key) is not None:
            raise ServiceError(409, "already_uploaded", "this attachment has been uploaded already")
        await self.blobs.begin_upload(AREA + grant.key, length)
        return UploadStatus(0, length, self._expires(int(time.time())))

    async def status(self, key: str) -> UploadStatus:
        state = await self.blobs.upload_state(AREA + key)
        if state is not None:
            if self._expires(state.started) < time.time():
                raise _not_found()
            return UploadStatus(state.offset, state.length, self._expires(state.started))
        info = await self.blobs.stat(AREA + key)
        if info is None:
            raise _not_found()
        return UploadStatus(info.size, info.size, None)

    async def append(self, key: str, offset: int, chunks: AsyncIterable[bytes], declared: int | None) -> UploadStatus:
        status = await self.status(key)
        if status.offset != offset:
            raise ServiceError(409, "offset_mismatch", f"the upload is at offset {status.offset}",
                               headers={"Upload-Offset": str(status.offset)})
        if declared is not None and offset + declared > status.length:
            raise ServiceError(413, "payload_too_large", "the chunk goes beyond Upload-Length")
        if status.expires is None:
            return status  # finished already; an empty PATCH at the end is harmless
        too_long = False
        try:
            new_offset = await self.blobs.append(AREA + key, offset, chunks)
        except OffsetMismatch as exc:
            raise ServiceError(409, "offset_mismatch", f"the upload is at offset {exc.offset}",
                               headers={"Upload-Offset": str(exc.offset)}) from exc
        except LookupError as exc:
            raise _not_found() from exc
        except UploadTooLong:
            too_long, new_offset = True, status.length
        if new_offset >= status.length:
            await self.blobs.finish_upload(AREA + key)
        if too_long:
            raise ServiceError(413, "payload_too_large", "the chunk goes beyond Upload-Length")
        return UploadStatus(new_offset, status.length, status.expires if new_offset < status.length else None)

    async def terminate(self, key: str) -> None:
        if await self.blobs.upload_state(AREA + key) is None:
            raise _not_found()
        await self.blobs.abort_upload(AREA + key)

    # -- downloads ----------------------------------------------------------------------------
    async def stat(self, key: str) -> BlobInfo:
        info = await self.blobs.stat(AREA + key) if valid_key(AREA + key) else None
        if info is None:
            raise ServiceError(404, "not_found", "no such attachment")
        return info

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        return self.blobs.read(AREA + key, start, end)

    # -- expiry (registered with the retention job) ---------------------------------------------
    async def purge_uploads(self, now: int) -> int:
        stale = [u.key async for u in self.blobs.list_uploads() if self._expires(u.started) < now]
        for key in stale:
            await self.blobs.abort_upload(key)
        return len(stale)

    async def purge_attachments(self, now: int) -> int:
        cutoff = now - int(self.settings.attachment_expiry_days * 86400)
        old = [b.key async for b in self.blobs.objects(AREA)
               if b.modified < cutoff and not is_group_avatar(b.key.removeprefix(AREA))]
        for key in old:
            await self.blobs.delete(key)
        return len(old)
