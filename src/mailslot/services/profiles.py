"""Profiles (digest §8): versioned encrypted profiles, who may read them (§7.3), and avatars.

The server stores ciphertext only and checks sizes, which are fixed by the clients' padding, so
that a length says nothing about the plaintext. Reads go to the database every time: an update is
visible to the very next read.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mailslot.config import MediaSettings
from mailslot.services.accounts import KNOWN_CAPABILITIES
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError, invalid
from mailslot.services.keys import ServiceId, check_access_key, unauthorized
from mailslot.services.post_policy import PolicyRejected, PolicySigner
from mailslot.services.ratelimit import RateLimiters
from mailslot.stores.blobs import BlobInfo, BlobStore, valid_key
from mailslot.stores.interfaces import AccountStore
from mailslot.stores.models import Account
from mailslot.stores.profiles import ProfileStore, VersionedProfile

AVATAR_AREA = "profiles/"
_VERSION = re.compile(r"^[0-9a-fA-F]{64}$")
# Padded ciphertext sizes clients produce (digest §8.1).
SIZES: dict[str, frozenset[int]] = {
    "name": frozenset({81, 285}),
    "aboutEmoji": frozenset({0, 60}),
    "about": frozenset({0, 156, 282, 540}),
    "paymentAddress": frozenset({0, 582}),
    "phoneNumberSharing": frozenset({0, 29}),
}
MAX_COMMITMENT = 1024
MAX_BADGES = 64
# Capabilities are public in profiles, except the primary device's own "transfer" flag.
PROFILE_CAPABILITIES = tuple(sorted(KNOWN_CAPABILITIES - {"transfer"}))


class AvatarChange(enum.Enum):
    UNCHANGED = "unchanged"
    CLEAR = "clear"
    UPDATE = "update"


@dataclass(slots=True)
class ProfileUpdate:
    version: str
    commitment: bytes
    name: bytes | None
    about: bytes | None
    about_emoji: bytes | None
    payment_address: bytes | None
    phone_number_sharing: bytes | None
    avatar: bool
    same_avatar: bool
    badge_ids: list[str] = field(default_factory=list)

    @property
    def avatar_change(self) -> AvatarChange:
        if not self.avatar:
            return AvatarChange.CLEAR
        return AvatarChange.UNCHANGED if self.same_avatar else AvatarChange.UPDATE


def access_checksum(uak: bytes | None) -> str | None:
    """``unidentifiedAccess``: HMAC-SHA256(key = UAK, 32 zero bytes), base64 (digest §7.3)."""
    if uak is None:
        return None
    return base64.b64encode(hmac.new(uak, bytes(32), hashlib.sha256).digest()).decode()


def public_capabilities(account: Account) -> dict[str, bool]:
    devices = account.devices
    return {name: bool(devices) and all(d.capabilities.get(name, False) for d in devices)
            for name in PROFILE_CAPABILITIES}


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _validate(update: ProfileUpdate) -> None:
    if not _VERSION.match(update.version):
        raise invalid("version must be 64 hexadecimal characters", "version")
    if not update.commitment or len(update.commitment) > MAX_COMMITMENT:
        raise invalid("commitment is required", "commitment")
    for name, value in (("name", update.name), ("aboutEmoji", update.about_emoji), ("about", update.about),
                        ("paymentAddress", update.payment_address),
                        ("phoneNumberSharing", update.phone_number_sharing)):
        if len(value or b"") not in SIZES[name]:
            sizes = ", ".join(str(s) for s in sorted(SIZES[name]))
            raise invalid(f"{name} must be {sizes} bytes", name)
    if len(update.badge_ids) > MAX_BADGES or any(not b or len(b) > 64 for b in update.badge_ids):
        raise invalid(f"badgeIds: at most {MAX_BADGES} ids of 1 to 64 characters", "badgeIds")


class ProfileService:
    def __init__(
        self,
        accounts: AccountStore,
        store: ProfileStore,
        blobs: BlobStore,
        limiters: RateLimiters,
        signer: PolicySigner,
        settings: MediaSettings,
    ) -> None:
        self.accounts = accounts
        self.store = store
        self.blobs = blobs
        self.limiters = limiters
        self.signer = signer
        self.settings = settings

    # -- PUT /v1/profile ------------------------------------------------------------------------
    async def set_profile(self, principal: Principal, update: ProfileUpdate) -> dict[str, str] | None:
        _validate(update)
        aci = principal.aci
        existing = await self.store.get(aci, update.version)
        current_avatar = existing.avatar if existing and existing.avatar else None
        if current_avatar is not None and not current_avatar.startswith(AVATAR_AREA):
            current_avatar = None
        change = update.avatar_change
        if change is AvatarChange.UPDATE:
            avatar: str | None = AVATAR_AREA + base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        elif change is AvatarChange.CLEAR:
            avatar = None
        else:
            avatar = current_avatar
        await self.store.save(aci, VersionedProfile(
            version=update.version, commitment=update.commitment, name=update.name, about=update.about or None,
            about_emoji=update.about_emoji or None, payment_address=update.payment_address or None,
            phone_number_sharing=update.phone_number_sharing or None, avatar=avatar,
        ), update.badge_ids)
        if change is not AvatarChange.UNCHANGED and current_avatar is not None and current_avatar != avatar:
            await self.blobs.delete(current_avatar)
        if change is AvatarChange.UPDATE:
            assert avatar is not None
            return self.signer.form(avatar, self.settings.avatar_max_bytes, self.settings.avatar_form_seconds)
        return None

    # -- reads ----------------------------------------------------------------------------------
    async def _target(self, caller: Principal | None, access_key: bytes | None, service_id: ServiceId) -> Account:
        if caller is not None:
            await self.limiters.check("profile", str(caller.aci))
            if service_id.is_pni:
                target = await self.accounts.get_by_pni(service_id.uuid)
            else:
                target = await self.accounts.get_by_aci(service_id.uuid)
            if target is None:
                raise ServiceError(404, "not_found", "account not found")
            return target
        target = None if service_id.is_pni else await self.accounts.get_by_aci(service_id.uuid)
        return check_access_key(target, service_id.is_pni, access_key)

    @staticmethod
    def _parse(text: str, caller: Principal | None, aci_only: bool) -> ServiceId:
        service_id = ServiceId.parse(text)
        if service_id is None or (aci_only and service_id.is_pni):
            if caller is None and service_id is not None:
                raise unauthorized()
            raise ServiceError(400, "invalid_identifier", "malformed service identifier")
        return service_id

    @staticmethod
    def _base(account: Account, is_pni: bool) -> dict[str, Any]:
        if is_pni:
            return {
                "identityKey": _b64(account.pni_identity_key), "unidentifiedAccess": None,
                "unrestrictedUnidentifiedAccess": False, "capabilities": public_capabilities(account),
                "badges": [], "uuid": f"PNI:{account.pni}",
            }
        return {
            "identityKey": _b64(account.aci_identity_key),
            "unidentifiedAccess": access_checksum(account.unidentified_access_key),
            "unrestrictedUnidentifiedAccess": account.unrestricted_unidentified_access,
            "capabilities": public_capabilities(account),
            # Badges need a catalogue and entitlements this server does not have: none are shown.
            "badges": [],
            "uuid": str(account.aci),
        }

    async def base_profile(self, caller: Principal | None, access_key: bytes | None, identifier: str) -> dict[str, Any]:
        service_id = self._parse(identifier, caller, aci_only=False)
        target = await self._target(caller, access_key, service_id)
        return self._base(target, service_id.is_pni)

    async def versioned_profile(
        self, caller: Principal | None, access_key: bytes | None, identifier: str, version: str
    ) -> dict[str, Any]:
        service_id = self._parse(identifier, caller, aci_only=True)
        target = await self._target(caller, access_key, service_id)
        body = self._base(target, False)
        profile = await self.store.get(target.aci, version) if _VERSION.match(version) else None
        current = await self.store.current(target.aci)
        show_payment = current is None or current.version == version
        body.update({
            "name": _b64(profile.name) if profile else None,
            "about": _b64(profile.about) if profile else None,
            "aboutEmoji": _b64(profile.about_emoji) if profile else None,
            "avatar": profile.avatar if profile else None,
            "paymentAddress": _b64(profile.payment_address) if profile and show_payment else None,
            "phoneNumberSharing": _b64(profile.phone_number_sharing) if profile else None,
        })
        return body

    # -- avatars on the built-in store ----------------------------------------------------------
    def check_avatar_post(self, fields: dict[str, str]) -> tuple[str, int, int]:
        """Verify the POST policy form; returns (blob key, min size, max size)."""
        try:
            key, low, high = self.signer.check(fields)
        except PolicyRejected as exc:
            raise ServiceError(403, "access_denied", f"the upload policy does not allow this: {exc}") from exc
        if not key.startswith(AVATAR_AREA) or not valid_key(key):
            raise ServiceError(403, "access_denied", "the upload policy does not allow this key")
        return key, max(1, low), min(high, self.settings.avatar_max_bytes)

    async def store_avatar(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        return await self.blobs.put(key, chunks)

    async def avatar_info(self, name: str) -> BlobInfo:
        key = AVATAR_AREA + name
        info = await self.blobs.stat(key) if valid_key(key) else None
        if info is None:
            raise ServiceError(404, "not_found", "no such avatar")
        return info

    def read_avatar(self, name: str, start: int, end: int) -> AsyncIterator[bytes]:
        return self.blobs.read(AVATAR_AREA + name, start, end)

    async def purge_orphan_avatars(self, now: int) -> int:
        """Avatars no profile names (an UPDATE whose POST came late, a deleted account), after a day."""
        cutoff = now - 86400
        candidates = [b.key async for b in self.blobs.objects(AVATAR_AREA) if b.modified < cutoff]
        orphans: list[str] = []
        for i in range(0, len(candidates), 500):
            batch = candidates[i:i + 500]
            in_use = await self.store.avatars_in_use(batch)
            orphans.extend(k for k in batch if k not in in_use)
        for key in orphans:
            await self.blobs.delete(key)
        return len(orphans)
