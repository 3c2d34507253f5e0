"""The profile store (digest §8): versioned, client-encrypted profiles and each account's current one."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class VersionedProfile:
    """One profile version. Every byte field is ciphertext the server cannot read."""

    version: str
    commitment: bytes
    name: bytes | None
    about: bytes | None
    about_emoji: bytes | None
    payment_address: bytes | None
    phone_number_sharing: bytes | None
    avatar: str | None  # blob key ``profiles/<id>``


@dataclass(slots=True)
class CurrentProfile:
    version: str
    badge_ids: list[str] = field(default_factory=list)


class ProfileStore(Protocol):
    async def get(self, aci: uuid.UUID, version: str) -> VersionedProfile | None: ...

    async def current(self, aci: uuid.UUID) -> CurrentProfile | None: ...

    async def save(self, aci: uuid.UUID, profile: VersionedProfile, badge_ids: list[str]) -> None:
        """Store the version (replacing one of that version) and make it current, atomically."""
        ...

    async def avatars_in_use(self, keys: list[str]) -> set[str]:
        """Which of these avatar keys a stored profile still names."""
        ...
