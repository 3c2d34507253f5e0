"""The blob store: opaque client-encrypted objects (attachments, avatars) and resumable uploads.

Two implementations live in :mod:`mailslot.backends.blobs`: a local directory (embedded default) and
any S3-compatible store. Keys are ``<area>/<name>`` with names from :func:`valid_key`'s alphabet.
Every operation streams: no implementation holds an object in memory beyond a bounded buffer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,128})?$")


def valid_key(key: str) -> bool:
    """``area/name`` (or a bare name) of URL-safe characters: never a path that escapes its root."""
    return bool(_KEY.match(key))


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    modified: int  # epoch seconds


@dataclass(frozen=True, slots=True)
class UploadState:
    key: str
    length: int  # the declared total length
    offset: int  # bytes received so far
    started: int  # epoch seconds


class OffsetMismatch(Exception):
    """An append did not start where the upload stands."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"upload is at offset {offset}")
        self.offset = offset


class UploadTooLong(Exception):
    """An append carried more bytes than the upload's declared length."""


class BlobStore(Protocol):
    # -- whole objects ------------------------------------------------------------------------
    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Store the object (replacing one of that key); returns its size."""
        ...

    async def stat(self, key: str) -> BlobInfo | None: ...

    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes ``start..end`` (end exclusive; None: to the end) of an existing object."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object if it exists."""
        ...

    def objects(self, prefix: str) -> AsyncIterator[BlobInfo]:
        """Objects whose key starts with ``prefix``."""
        ...

    # -- resumable uploads: bytes appended in order, then published under the same key -----------
    async def begin_upload(self, key: str, length: int) -> None: ...

    async def upload_state(self, key: str) -> UploadState | None: ...

    async def append(self, key: str, offset: int, chunks: AsyncIterable[bytes]) -> int:
        """Append at ``offset`` (else :class:`OffsetMismatch`); returns the new offset.

        Bytes that arrived before ``chunks`` broke off (a cut connection) are kept, so that the
        client can resume from the offset :meth:`upload_state` reports. Beyond the declared
        length raises :class:`UploadTooLong` after keeping what fits.
        """
        ...

    async def finish_upload(self, key: str) -> None:
        """Publish a complete upload as the object ``key``."""
        ...

    async def abort_upload(self, key: str) -> None: ...

    def list_uploads(self) -> AsyncIterator[UploadState]:
        """Unfinished uploads (``offset`` may be reported as 0 where it is costly to learn)."""
        ...

    async def close(self) -> None: ...
