"""Composition of the media services (profiles, attachments) — part of :mod:`mailslot.wiring`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from mailslot.backends.blobs.setup import open_blobs
from mailslot.config import Settings
from mailslot.services.attachments import AttachmentService
from mailslot.services.container import Services
from mailslot.services.post_policy import PolicySigner
from mailslot.services.profiles import ProfileService
from mailslot.services.upload_tokens import UploadTokens
from mailslot.storage_setup import Storage

SecretFile = Callable[[Path, str], bytes]


def _secret(configured: str, data_dir: Path, name: str, secret_file: SecretFile) -> bytes:
    return configured.encode() if configured else secret_file(data_dir, name)


def add_media(services: Services, storage: Storage, settings: Settings, data_dir: Path,
              secret_file: SecretFile) -> None:
    media = settings.media
    blobs = open_blobs(media, data_dir)
    services.closers.append(blobs.close)
    tokens = UploadTokens(_secret(media.upload_secret, data_dir, "upload.secret", secret_file),
                          media.upload_token_seconds)
    attachments = AttachmentService(blobs, services.limiters, media, tokens)
    services.attachments = attachments
    services.retention.purges["attachment_uploads"] = attachments.purge_uploads
    services.retention.purges["attachments"] = attachments.purge_attachments
    groups = services.groups
    groups.avatars = attachments
    services.retention.purges["group_avatars"] = functools.partial(
        attachments.purge_group_avatars, in_use=groups.store.avatars_in_use
    )
    if storage.profiles is None:
        return
    if media.backend == "s3" and media.s3_access_key:
        signer = PolicySigner(media.s3_bucket, media.s3_region, media.s3_access_key, media.s3_secret_key)
    else:
        secret = media.avatar_secret_key or secret_file(data_dir, "avatar.secret").hex()
        signer = PolicySigner("mailslot", media.s3_region, media.avatar_access_key, secret)
    profiles = ProfileService(services.accounts.store, storage.profiles, blobs, services.limiters, signer, media)
    services.profiles = profiles
    services.retention.purges["orphan_avatars"] = profiles.purge_orphan_avatars
