"""Plain records passed between services and stores."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

PRIMARY_DEVICE_ID = 1


@dataclass(slots=True)
class Device:
    device_id: int
    auth_hash: str
    auth_salt: str
    registration_id: int
    pni_registration_id: int | None
    name: bytes | None
    fetches_messages: bool
    capabilities: dict[str, bool]
    created_at: int
    last_seen: int
    user_agent: str | None = None
    gcm_token: str | None = None
    apn_token: str | None = None
    token_generation: str = ""

    @property
    def is_primary(self) -> bool:
        return self.device_id == PRIMARY_DEVICE_ID


@dataclass(slots=True)
class Account:
    aci: uuid.UUID
    number: str | None
    pni: uuid.UUID | None
    aci_identity_key: bytes
    pni_identity_key: bytes | None
    unidentified_access_key: bytes | None
    unrestricted_unidentified_access: bool
    discoverable_by_phone_number: bool
    created_at: int
    registration_lock_hash: str | None = None
    registration_lock_salt: str | None = None
    recovery_password_hash: str | None = None
    recovery_password_salt: str | None = None
    totp_secret: str | None = None
    totp_pending_secret: str | None = None
    totp_backup_codes: list[str] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)

    def copy(self) -> Account:
        """A copy whose devices and lists can be changed without touching this one."""
        return replace(
            self,
            totp_backup_codes=list(self.totp_backup_codes),
            devices=[replace(d, capabilities=dict(d.capabilities)) for d in self.devices],
        )

    def device(self, device_id: int) -> Device | None:
        for device in self.devices:
            if device.device_id == device_id:
                return device
        return None

    @property
    def primary(self) -> Device | None:
        return self.device(PRIMARY_DEVICE_ID)


@dataclass(slots=True)
class SignedPreKey:
    key_id: int
    public_key: bytes
    signature: bytes


@dataclass(slots=True)
class PreKey:
    key_id: int
    public_key: bytes


@dataclass(slots=True)
class DeviceBundle:
    """What a bundle fetch hands out for one device."""

    device_id: int
    signed_pre_key: SignedPreKey
    pre_key: PreKey | None
    pq_pre_key: SignedPreKey


@dataclass(slots=True)
class DeviceKeys:
    """The repeated-use keys a device publishes for one identity (ACI or PNI)."""

    identity: str  # "aci" | "pni"
    signed_pre_key: SignedPreKey
    last_resort_pre_key: SignedPreKey


@dataclass(slots=True)
class VerificationSession:
    id: str
    number: str
    created_at: int
    updated_at: int
    expires_at: int
    verified: bool = False
    code_hash: str | None = None
    code_expires_at: int | None = None
    code_attempts: int = 0
    code_requests: int = 0
    last_sms_at: int | None = None
    last_call_at: int | None = None
    push_token: str | None = None
    push_token_type: str | None = None


@dataclass(slots=True)
class RefreshToken:
    token_id: str
    family_id: str
    aci: uuid.UUID
    device_id: int
    expires_at: int
    used: bool


@dataclass(slots=True)
class NewMessage:
    """One envelope to queue for one device (``envelope`` already sealed for storage)."""

    aci: uuid.UUID
    device_id: int
    guid: uuid.UUID
    envelope: bytes
    expires_at: int
    shared_id: uuid.UUID | None = None
    recipient_part: bytes | None = None


@dataclass(slots=True)
class StoredMessage:
    id: int
    guid: uuid.UUID
    envelope: bytes
    expires_at: int
    shared_id: uuid.UUID | None = None
    shared_data: bytes | None = None
    recipient_part: bytes | None = None


@dataclass(slots=True)
class SharedPayload:
    id: uuid.UUID
    data: bytes
    expires_at: int
