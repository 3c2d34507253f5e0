"""Opens the blob store that ``[media]`` names."""

from __future__ import annotations

from pathlib import Path

from mailslot.backends.blobs.local import LocalBlobStore
from mailslot.backends.blobs.s3 import S3BlobStore
from mailslot.config import MediaSettings
from mailslot.stores.blobs import BlobStore


def open_blobs(settings: MediaSettings, data_dir: Path) -> BlobStore:
    if settings.backend == "s3":
        if not settings.s3_bucket:
            raise ValueError("[media] backend = \"s3\" needs s3_bucket")
        return S3BlobStore(
            settings.s3_bucket, endpoint=settings.s3_endpoint, region=settings.s3_region,
            access_key=settings.s3_access_key, secret_key=settings.s3_secret_key, part_bytes=settings.s3_part_bytes,
        )
    return LocalBlobStore(Path(settings.directory) if settings.directory else data_dir / "blobs")
