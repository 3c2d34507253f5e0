"""Registration (digest §1.2) and account management (§10, API.md §1.2)."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mailslot.crypto import tokenhash, xeddsa
from mailslot.crypto.keys import is_valid_ec_public_key, is_valid_kem_public_key
from mailslot.services import totp as totp_rules
from mailslot.services.errors import ServiceError, invalid
from mailslot.services.ratelimit import RateLimiters, RateLimitExceeded
from mailslot.services.verification import VerificationService
from mailslot.stores.interfaces import AccountStore
from mailslot.stores.models import PRIMARY_DEVICE_ID, Account, Device, DeviceKeys, SignedPreKey

REGISTRATION_LOCK_WINDOW_MS = 7 * 86_400_000
REQUIRED_CAPABILITIES = ("spqr",)
# Capabilities a device may declare; others are ignored (digest §1.3).
KNOWN_CAPABILITIES = frozenset(
    {"storage", "transfer", "attachmentBackfill", "spqr", "profiles_v2", "usernameChangeSyncMessage",
     "optionalPhoneNumber"}
)

DisconnectListener = Callable[[uuid.UUID, list[int] | None], Awaitable[None]]


# Tries of a registration that keeps losing races with concurrent registrations of the same number.
REGISTRATION_ATTEMPTS = 3


class _LostRace(Exception):
    """The number's account changed between reading it and writing the registration."""


def _state(account: Account | None) -> tuple[uuid.UUID, str] | None:
    """What identifies one registration of a number: its ACI and its primary device's token generation."""
    if account is None:
        return None
    primary = account.primary
    return account.aci, primary.token_generation if primary else ""


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class AccountAttributes:
    fetches_messages: bool = False
    registration_id: int = 0
    pni_registration_id: int | None = None
    name: bytes | None = None
    capabilities: dict[str, bool] = field(default_factory=dict)
    registration_lock: str | None = None
    unidentified_access_key: bytes | None = None
    unrestricted_unidentified_access: bool = False
    discoverable_by_phone_number: bool = True
    recovery_password: bytes | None = None


@dataclass(slots=True)
class RegistrationRequest:
    session_id: str | None
    recovery_password: bytes | None
    totp: int | None
    attributes: AccountAttributes
    skip_device_transfer: bool
    aci_identity_key: bytes
    pni_identity_key: bytes | None
    aci_signed_pre_key: SignedPreKey
    pni_signed_pre_key: SignedPreKey | None
    aci_pq_last_resort_pre_key: SignedPreKey
    pni_pq_last_resort_pre_key: SignedPreKey | None
    apn_token: str | None
    gcm_token: str | None


@dataclass(slots=True)
class RegistrationResult:
    account: Account
    reregistration: bool
    storage_capable: bool


def verify_signed_keys(identity_key: bytes, ec_key: SignedPreKey | None, kem_keys: list[SignedPreKey]) -> None:
    """Raise 422 unless every signed key is well-formed and XEdDSA-signed by ``identity_key``."""
    if ec_key is not None:
        if not is_valid_ec_public_key(ec_key.public_key):
            raise invalid("signed pre-key is not a 33-byte Curve25519 key", "signedPreKey")
        if not xeddsa.verify(identity_key, ec_key.public_key, ec_key.signature):
            raise ServiceError(422, "invalid_signature", "Invalid signature")
    for kem in kem_keys:
        if not is_valid_kem_public_key(kem.public_key):
            raise invalid("KEM pre-key is not a 1569-byte Kyber1024 or ML-KEM-1024 key", "pqPreKey")
        if not xeddsa.verify(identity_key, kem.public_key, kem.signature):
            raise ServiceError(422, "invalid_signature", "Invalid signature")


def identity_response(account: Account) -> dict[str, Any]:
    """``AccountIdentityResponse`` (digest §1.2)."""
    primary = account.primary
    return {
        "uuid": str(account.aci),
        "number": account.number,
        "pni": str(account.pni) if account.pni else None,
        "usernameHash": None,
        "usernameLinkHandle": None,
        "storageCapable": bool(primary and primary.capabilities.get("storage")),
        "entitlements": {"badges": [], "backup": None},
    }


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        verification: VerificationService,
        limiters: RateLimiters,
    ) -> None:
        self.store = store
        self.verification = verification
        self.limiters = limiters
        self.disconnect_listeners: list[DisconnectListener] = []

    async def get_by_aci(self, aci: uuid.UUID) -> Account | None:
        return await self.store.get_by_aci(aci)

    async def touch_device(self, aci: uuid.UUID, device_id: int, last_seen: int) -> None:
        await self.store.touch_device(aci, device_id, last_seen)

    async def disconnect(self, aci: uuid.UUID, device_ids: list[int] | None = None) -> None:
        """Close the sockets of the account's devices (all, or those listed) with 4401."""
        await self._disconnect(aci, device_ids)

    async def _disconnect(self, aci: uuid.UUID, device_ids: list[int] | None = None) -> None:
        for listener in self.disconnect_listeners:
            await listener(aci, device_ids)

    # -- registration -------------------------------------------------------------------------------

    def _validate_registration(self, request: RegistrationRequest) -> None:
        attrs = request.attributes
        pni_parts = [
            request.pni_identity_key is not None,
            request.pni_signed_pre_key is not None,
            request.pni_pq_last_resort_pre_key is not None,
            attrs.pni_registration_id is not None,
        ]
        if any(pni_parts) and not all(pni_parts):
            raise invalid("PNI identity key, PNI keys and pniRegistrationId must all be present or all absent")
        if not all(pni_parts):
            raise invalid("accounts with a phone number need a PNI identity and PNI keys", "pniIdentityKey")
        if attrs.fetches_messages:
            if request.apn_token or request.gcm_token:
                raise invalid("a device that fetches messages takes no push token", "apnToken")
        elif bool(request.apn_token) == bool(request.gcm_token):
            raise invalid("exactly one of apnToken and gcmToken is needed unless fetchesMessages is true")
        if attrs.unidentified_access_key is None and not attrs.unrestricted_unidentified_access:
            raise invalid("unidentifiedAccessKey is required", "accountAttributes.unidentifiedAccessKey")
        for name in REQUIRED_CAPABILITIES:
            if not attrs.capabilities.get(name):
                raise ServiceError(499, "capability_required", f"the {name} capability is required")
        for key in (request.aci_identity_key, request.pni_identity_key):
            if key is not None and not is_valid_ec_public_key(key):
                raise invalid("identity key is not a 33-byte Curve25519 key", "aciIdentityKey")
        verify_signed_keys(
            request.aci_identity_key, request.aci_signed_pre_key, [request.aci_pq_last_resort_pre_key]
        )
        assert request.pni_identity_key is not None and request.pni_pq_last_resort_pre_key is not None
        verify_signed_keys(
            request.pni_identity_key, request.pni_signed_pre_key, [request.pni_pq_last_resort_pre_key]
        )

    async def _check_recovery_password(self, number: str, recovery_password: bytes) -> None:
        existing = await self.store.get_by_number(number)
        if (
            existing is None
            or not existing.recovery_password_hash
            or not existing.recovery_password_salt
            or not tokenhash.verify(
                recovery_password.hex(), existing.recovery_password_hash, existing.recovery_password_salt
            )
        ):
            raise ServiceError(403, "invalid_recovery_password", "recovery password is not valid")

    async def _check_registration_lock(self, existing: Account, request: RegistrationRequest) -> None:
        if not existing.registration_lock_hash or not existing.registration_lock_salt:
            return
        primary = existing.primary
        last_seen = primary.last_seen if primary else existing.created_at
        remaining = last_seen + REGISTRATION_LOCK_WINDOW_MS - now_ms()
        if remaining <= 0:
            return  # the lock expired with the account's inactivity
        supplied = request.attributes.registration_lock
        if supplied and tokenhash.verify(supplied, existing.registration_lock_hash, existing.registration_lock_salt):
            return
        if supplied:
            assert existing.number is not None
            await self.limiters.check("pin", existing.number)
        await self.store.freeze_credentials(existing.aci)
        if request.recovery_password is None or supplied:
            existing.recovery_password_hash = existing.recovery_password_salt = None
            await self.store.update_account(existing)
        await self._disconnect(existing.aci)
        raise ServiceError(
            423, "registration_locked", "registration lock is enabled",
            body={"timeRemaining": remaining, "svr2Credentials": None},
        )

    async def _check_totp(self, existing: Account, code: int | None) -> None:
        if not existing.totp_secret:
            return
        try:
            await self.limiters.check("checkTotp", str(existing.aci))
        except RateLimitExceeded:
            raise
        if code is None or not totp_rules.check_code(existing, code):
            raise ServiceError(441, "totp_required", "a valid TOTP or backup code is required")
        await self.store.update_account(existing)  # a used backup code is gone

    async def register(
        self, number: str, password: str, request: RegistrationRequest, user_agent: str | None
    ) -> RegistrationResult:
        if not password or len(password) > 512:
            raise ServiceError(401, "invalid_credentials", "a password for the new device is required")
        await self.limiters.check("registration", number)
        if request.session_id is not None:
            verified_number = await self.verification.verified_number(request.session_id)
            if verified_number != number:
                raise ServiceError(400, "number_mismatch", "session was verified for a different number")
        elif request.recovery_password is not None:
            await self._check_recovery_password(number, request.recovery_password)
        else:
            raise invalid("sessionId or recoveryPassword is required", "sessionId")
        self._validate_registration(request)

        for _ in range(REGISTRATION_ATTEMPTS):
            existing = await self.store.get_by_number(number)
            try:
                return await self._create_or_reclaim(number, password, request, user_agent, existing)
            except _LostRace:
                continue  # the number's account changed under us: decide again against what is there now
        raise ServiceError(503, "registration_busy", "the number is being registered concurrently; try again",
                           headers={"Retry-After": "1"})

    async def _create_or_reclaim(
        self, number: str, password: str, request: RegistrationRequest, user_agent: str | None,
        existing: Account | None,
    ) -> RegistrationResult:
        if existing is not None:
            primary = existing.primary
            if not request.skip_device_transfer and primary and primary.capabilities.get("transfer"):
                raise ServiceError(409, "device_transfer_available", "a device transfer is possible")
            await self._check_registration_lock(existing, request)
            await self._check_totp(existing, request.totp)

        attrs = request.attributes
        created = now_ms()
        aci = existing.aci if existing else uuid.uuid4()
        pni = await self.store.get_or_create_pni(number)
        account = Account(
            aci=aci,
            number=number,
            pni=pni,
            aci_identity_key=request.aci_identity_key,
            pni_identity_key=request.pni_identity_key,
            unidentified_access_key=attrs.unidentified_access_key,
            unrestricted_unidentified_access=attrs.unrestricted_unidentified_access,
            discoverable_by_phone_number=attrs.discoverable_by_phone_number,
            created_at=existing.created_at if existing else created,
            totp_secret=existing.totp_secret if existing else None,
            totp_backup_codes=existing.totp_backup_codes if existing else [],
        )
        self._apply_lock_and_recovery(account, attrs)
        primary_device = new_device(
            PRIMARY_DEVICE_ID, password, attrs, user_agent, request.apn_token, request.gcm_token, created
        )
        account.devices = [primary_device]
        keys = [DeviceKeys("aci", request.aci_signed_pre_key, request.aci_pq_last_resort_pre_key)]
        if request.pni_signed_pre_key and request.pni_pq_last_resort_pre_key:
            keys.append(DeviceKeys("pni", request.pni_signed_pre_key, request.pni_pq_last_resort_pre_key))
        storage_capable = bool(existing and existing.primary and existing.primary.capabilities.get("storage"))
        try:
            await self.store.create_or_replace(account, primary_device, keys, reclaimed=existing is not None)
        except Exception as exc:
            # A concurrent registration of the same number committed first, so the store refused a
            # duplicate number, PNI or device row. Then this request is a re-registration of what that
            # one wrote (with the lock and TOTP checks that implies); any other failure stays an error.
            if _state(await self.store.get_by_number(number)) != _state(existing):
                raise _LostRace from exc
            raise
        if existing is not None:
            await self._disconnect(aci)
        return RegistrationResult(account, existing is not None, storage_capable)

    @staticmethod
    def _apply_lock_and_recovery(account: Account, attrs: AccountAttributes) -> None:
        if attrs.registration_lock:
            account.registration_lock_hash, account.registration_lock_salt = tokenhash.generate(
                attrs.registration_lock
            )
        else:
            account.registration_lock_hash = account.registration_lock_salt = None
        if attrs.recovery_password:
            account.recovery_password_hash, account.recovery_password_salt = tokenhash.generate(
                attrs.recovery_password.hex()
            )

    # -- account endpoints --------------------------------------------------------------------------

    async def set_attributes(self, account: Account, device: Device, attrs: AccountAttributes,
                             user_agent: str | None) -> None:
        if attrs.discoverable_by_phone_number and account.number is None:
            raise ServiceError(400, "no_number", "an account without a number cannot be discoverable")
        if attrs.unidentified_access_key is None and not attrs.unrestricted_unidentified_access:
            attrs.unidentified_access_key = account.unidentified_access_key
        device.fetches_messages = attrs.fetches_messages
        device.name = attrs.name
        device.capabilities = known_capabilities(attrs.capabilities)
        device.registration_id = attrs.registration_id
        if attrs.pni_registration_id is not None:
            device.pni_registration_id = attrs.pni_registration_id
        if user_agent:
            device.user_agent = platform_tag(user_agent)
        account.unidentified_access_key = attrs.unidentified_access_key
        account.unrestricted_unidentified_access = attrs.unrestricted_unidentified_access
        account.discoverable_by_phone_number = attrs.discoverable_by_phone_number
        self._apply_lock_and_recovery(account, attrs)
        await self.store.update_device(account.aci, device)
        await self.store.update_account(account)

    async def set_push_token(self, account: Account, device: Device, kind: str, token: str | None) -> None:
        if kind == "gcm":
            if token is not None and device.gcm_token == token:
                return
            device.gcm_token = token
            if token is not None:
                device.apn_token = None
                device.fetches_messages = False
        else:
            device.apn_token = token
            if token is not None:
                device.gcm_token = None
                device.fetches_messages = False
        await self.store.update_device(account.aci, device)

    async def set_registration_lock(self, account: Account, token: str | None) -> None:
        if token:
            account.registration_lock_hash, account.registration_lock_salt = tokenhash.generate(token)
        else:
            account.registration_lock_hash = account.registration_lock_salt = None
        await self.store.update_account(account)

    async def delete(self, account: Account) -> None:
        await self.store.delete_account(account.aci)
        await self._disconnect(account.aci)

    async def exists(self, aci: uuid.UUID | None, pni: uuid.UUID | None) -> bool:
        if aci is not None:
            return await self.store.get_by_aci(aci) is not None
        return pni is not None and await self.store.get_by_pni(pni) is not None

    def data_report(self, account: Account) -> dict[str, Any]:
        now = datetime.now(UTC).replace(microsecond=0)

        def iso(ms: int) -> str:
            return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        data = {
            "account": {
                "phoneNumber": account.number,
                "badges": [],
                "allowSealedSenderFromAnyone": account.unrestricted_unidentified_access,
                "findAccountByPhoneNumber": account.discoverable_by_phone_number,
            },
            "devices": [
                {"id": d.device_id, "lastSeen": iso(d.last_seen), "created": iso(d.created_at),
                 "userAgent": d.user_agent}
                for d in account.devices
            ],
        }
        lines = [
            "# Account",
            f"Phone Number: {account.number}",
            f"Allow Sealed Sender From Anyone: {account.unrestricted_unidentified_access}",
            f"Find Account By Phone Number: {account.discoverable_by_phone_number}",
            "Badges: None",
            "",
            "# Devices",
        ]
        for d in data["devices"]:
            assert isinstance(d, dict)
            lines += [f"- ID: {d['id']}", f"  Created: {d['created']}", f"  Last Seen: {d['lastSeen']}",
                      f"  User-Agent: {d['userAgent']}"]
        return {
            "reportId": str(uuid.uuid4()),
            "reportTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": data,
            "text": "\n".join(lines) + "\n",
        }


def new_device(
    device_id: int,
    password: str,
    attrs: AccountAttributes,
    user_agent: str | None,
    apn_token: str | None,
    gcm_token: str | None,
    created_ms: int,
) -> Device:
    """A device record as registration and linking create it (password hashed, last-seen to the day)."""
    auth_hash, auth_salt = tokenhash.generate(password)
    return Device(
        device_id=device_id,
        auth_hash=auth_hash,
        auth_salt=auth_salt,
        registration_id=attrs.registration_id,
        pni_registration_id=attrs.pni_registration_id,
        name=attrs.name,
        fetches_messages=attrs.fetches_messages,
        capabilities=known_capabilities(attrs.capabilities),
        created_at=created_ms,
        last_seen=created_ms - created_ms % 86_400_000,
        user_agent=platform_tag(user_agent),
        gcm_token=gcm_token,
        apn_token=apn_token,
        token_generation=secrets.token_hex(16),
    )


def known_capabilities(capabilities: dict[str, bool]) -> dict[str, bool]:
    return {name: True for name, on in capabilities.items() if on and name in KNOWN_CAPABILITIES}


def platform_tag(user_agent: str | None) -> str | None:
    """Keep only the short platform tag (``OWA``, ``OWI``, ``OWD``, ``OWP``), never a full user agent."""
    if not user_agent:
        return None
    tag = user_agent.strip()[:16]
    return tag if tag.isalnum() else None
