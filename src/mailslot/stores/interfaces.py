"""Typed interfaces that services depend on; backends implement them."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from mailslot.stores.models import (
    Account,
    Device,
    DeviceBundle,
    DeviceKeys,
    NewMessage,
    PreKey,
    RefreshToken,
    SharedPayload,
    SignedPreKey,
    StoredMessage,
    VerificationSession,
)


class AccountStore(Protocol):
    async def get_by_aci(self, aci: uuid.UUID) -> Account | None: ...

    async def get_many_by_aci(self, acis: list[uuid.UUID]) -> dict[uuid.UUID, Account]:
        """The accounts that exist among ``acis``, by ACI (unknown ones are left out)."""
        ...

    async def get_by_number(self, number: str) -> Account | None: ...

    async def get_by_pni(self, pni: uuid.UUID) -> Account | None: ...

    async def get_or_create_pni(self, number: str) -> uuid.UUID: ...

    async def create_or_replace(
        self, account: Account, primary: Device, keys: list[DeviceKeys], reclaimed: bool
    ) -> None:
        """Write a fresh account with its primary device and keys in one transaction.

        When ``reclaimed`` is true the account already exists: its devices, keys, tokens and any data
        keyed by the account are dropped first, in the same transaction.
        """
        ...

    async def update_account(self, account: Account) -> None:
        """Persist the account-level fields (not devices)."""
        ...

    async def update_device(self, aci: uuid.UUID, device: Device) -> None: ...

    async def touch_device(self, aci: uuid.UUID, device_id: int, last_seen: int) -> None: ...

    async def freeze_credentials(self, aci: uuid.UUID) -> None:
        """Make every device password of the account unusable (registration lock triggered)."""
        ...

    async def delete_account(self, aci: uuid.UUID) -> None:
        """Delete every row that belongs to the account, in one transaction."""
        ...

    async def add_device(self, aci: uuid.UUID, device: Device, keys: list[DeviceKeys], max_devices: int) -> int | None:
        """Add a linked device with the lowest free id ≥ 2 (set on ``device``); None when full."""
        ...

    async def remove_device(self, aci: uuid.UUID, device_id: int) -> bool: ...

    async def use_link_token(self, token_hash: str, expires_at: int) -> bool:
        """Record a device-link token as used; False if it already was."""
        ...

    async def get_device_keys(self, aci: uuid.UUID, device_id: int) -> list[DeviceKeys]: ...

    async def count_rows_for(self, aci: uuid.UUID) -> dict[str, int]:
        """Rows per table that reference the account (used by the data report and tests)."""
        ...


class VerificationSessionStore(Protocol):
    async def insert(self, session: VerificationSession) -> None: ...

    async def get(self, session_id: str) -> VerificationSession | None: ...

    async def update(self, session: VerificationSession) -> None: ...

    async def compare_and_set(self, session_id: str, expected: dict[str, Any], values: dict[str, Any]) -> bool:
        """Write ``values`` only if the session's columns still hold ``expected``; True if written.

        The atomic step that keeps concurrent code requests and guesses from being counted twice."""
        ...

    async def delete_expired(self, now: int) -> int: ...


class RefreshTokenStore(Protocol):
    async def insert(self, token: RefreshToken) -> None: ...

    async def mark_used(self, aci: uuid.UUID, token_id: str) -> RefreshToken | None:
        """Atomically mark the account's token used; returns it as it was before, or None if unknown.

        The account id (the refresh JWT's ``sub``) comes along so that sharded storage finds the token
        on the account's shard."""
        ...

    async def revoke_family(self, aci: uuid.UUID, family_id: str) -> None: ...


class RateLimitBackend(Protocol):
    async def take(self, key: str, capacity: float, permit_seconds: float, permits: float) -> float | None:
        """Take ``permits`` from the bucket; None on success, else seconds until enough tokens exist."""
        ...

    async def take_many(self, buckets: list[tuple[str, float, float, float]]) -> tuple[int, float] | None:
        """``take`` for (key, capacity, permit_seconds, permits) in order, stopping at the first refusal:
        its index and wait, or None. One round trip where the backend is remote."""
        ...

    async def reset(self, key: str) -> None: ...


class KeyStore(Protocol):
    """One-time and repeated-use pre-keys per (account, identity, device)."""

    async def store_keys(
        self,
        aci: uuid.UUID,
        identity: str,
        device_id: int,
        ec_keys: list[PreKey] | None,
        kem_keys: list[SignedPreKey] | None,
        signed_pre_key: SignedPreKey | None,
        last_resort_pre_key: SignedPreKey | None,
    ) -> None:
        """Replace the non-None parts in one transaction (a list replaces the whole pool)."""
        ...

    async def counts(self, aci: uuid.UUID, identity: str, device_id: int) -> tuple[int, int]: ...

    async def get_signed_keys(
        self, aci: uuid.UUID, identity: str, device_id: int
    ) -> tuple[SignedPreKey, SignedPreKey] | None:
        """The device's signed EC pre-key and last-resort KEM key, if it has uploaded them."""
        ...

    async def take_bundle(self, aci: uuid.UUID, identity: str, device_ids: list[int]) -> list[DeviceBundle]:
        """For each device with a signed and a last-resort key: atomically take at most one one-time EC
        and one one-time KEM key (the last-resort key stands in when no KEM key is left)."""
        ...


class MessageStore(Protocol):
    """Per-device queues of envelopes, oldest first."""

    async def apply(
        self, messages: list[NewMessage], shared: list[SharedPayload], deletes: list[tuple[uuid.UUID, int, int]]
    ) -> list[int]:
        """Inserts and deletes gathered from many requests, in one transaction (group commit)."""
        ...

    async def fetch(
        self, aci: uuid.UUID, device_id: int, exclude: set[int], limit: int, now: int
    ) -> list[StoredMessage]:
        """The oldest unexpired messages of the queue, skipping the ids in ``exclude``."""
        ...

    async def delete(self, aci: uuid.UUID, device_id: int, ids: list[int]) -> int: ...

    async def take_by_guid(self, aci: uuid.UUID, device_id: int, guid: uuid.UUID) -> StoredMessage | None:
        """Delete the message with this GUID from the queue and return it, if it was there."""
        ...

    async def delete_device(self, aci: uuid.UUID, device_id: int | None) -> None: ...

    async def count(self, aci: uuid.UUID, device_id: int) -> int: ...

    async def delete_expired(self, now: int) -> int: ...
