"""The pre-key store rules (digest §4) and who may fetch a bundle (§4.1, §7.3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from dataclasses import dataclass
from typing import Any

from mailslot.crypto.keys import is_valid_ec_public_key
from mailslot.services.accounts import verify_signed_keys
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError, invalid
from mailslot.services.ratelimit import RateLimiters
from mailslot.stores.interfaces import AccountStore, KeyStore
from mailslot.stores.models import Account, PreKey, SignedPreKey

MAX_KEYS_PER_UPLOAD = 100
UAK_LENGTH = 16


@dataclass(slots=True)
class KeyUpload:
    pre_keys: list[PreKey]
    signed_pre_key: SignedPreKey | None
    pq_pre_keys: list[SignedPreKey]
    pq_last_resort_pre_key: SignedPreKey | None


@dataclass(frozen=True, slots=True)
class ServiceId:
    uuid: uuid.UUID
    is_pni: bool

    @classmethod
    def parse(cls, text: str) -> ServiceId | None:
        is_pni = text.startswith("PNI:")
        raw = text[4:] if is_pni else text
        if len(raw) != 36:
            return None
        try:
            return cls(uuid.UUID(raw), is_pni)
        except ValueError:
            return None


def unauthorized() -> ServiceError:
    return ServiceError(401, "unauthorized", "missing or invalid credentials",
                        headers={"WWW-Authenticate": 'Basic realm="Mailslot"'})


def check_access_key(target: Account | None, is_pni: bool, access_key: bytes | None) -> Account:
    """Anonymous access rule (§7.3): 401 for every failure, so nobody learns whether an account exists."""
    if target is None or is_pni or access_key is None or len(access_key) != UAK_LENGTH:
        raise unauthorized()
    if target.unrestricted_unidentified_access:
        return target
    if target.unidentified_access_key is None or not hmac.compare_digest(
        target.unidentified_access_key, access_key
    ):
        raise unauthorized()
    return target


def identity_key_for(account: Account, identity: str) -> bytes | None:
    return account.aci_identity_key if identity == "aci" else account.pni_identity_key


class KeyService:
    def __init__(self, accounts: AccountStore, keys: KeyStore, limiters: RateLimiters) -> None:
        self.accounts = accounts
        self.keys = keys
        self.limiters = limiters

    def _identity_key(self, account: Account, identity: str) -> bytes:
        key = identity_key_for(account, identity)
        if key is None:
            raise ServiceError(400, "no_pni", "this account has no phone-number identity")
        return key

    async def upload(self, principal: Principal, identity: str, upload: KeyUpload) -> None:
        identity_key = self._identity_key(principal.account, identity)
        if len(upload.pre_keys) > MAX_KEYS_PER_UPLOAD or len(upload.pq_pre_keys) > MAX_KEYS_PER_UPLOAD:
            raise invalid(f"at most {MAX_KEYS_PER_UPLOAD} keys per list")
        for key in upload.pre_keys:
            if not is_valid_ec_public_key(key.public_key):
                raise invalid("pre-key is not a 33-byte Curve25519 key", "preKeys")
        kem_keys = list(upload.pq_pre_keys)
        if upload.pq_last_resort_pre_key is not None:
            kem_keys.append(upload.pq_last_resort_pre_key)
        # One bad signature refuses the whole upload; nothing is stored before every check passed.
        verify_signed_keys(identity_key, upload.signed_pre_key, kem_keys)
        for keys, name in ((upload.pre_keys, "preKeys"), (upload.pq_pre_keys, "pqPreKeys")):
            if len({k.key_id for k in keys}) != len(keys):
                raise invalid("key ids in a list must be distinct", name)
        if (upload.signed_pre_key is None) != (upload.pq_last_resort_pre_key is None):
            if await self.keys.get_signed_keys(principal.aci, identity, principal.device_id) is None:
                raise invalid("a device's first upload needs both signedPreKey and pqLastResortPreKey")
        await self.keys.store_keys(
            principal.aci,
            identity,
            principal.device_id,
            upload.pre_keys or None,
            upload.pq_pre_keys or None,
            upload.signed_pre_key,
            upload.pq_last_resort_pre_key,
        )

    async def counts(self, principal: Principal, identity: str) -> dict[str, int]:
        self._identity_key(principal.account, identity)
        ec, kem = await self.keys.counts(principal.aci, identity, principal.device_id)
        return {"count": ec, "pqCount": kem}

    async def check(self, principal: Principal, identity: str, digest: bytes) -> bool:
        """Whether the client's view of its repeated-use keys matches ours (``POST /v2/keys/check``)."""
        identity_key = self._identity_key(principal.account, identity)
        stored = await self.keys.get_signed_keys(principal.aci, identity, principal.device_id)
        if stored is None:
            return False
        signed, last_resort = stored
        expected = hashlib.sha256(
            identity_key
            + signed.key_id.to_bytes(8, "big")
            + signed.public_key
            + last_resort.key_id.to_bytes(8, "big")
            + last_resort.public_key
        ).digest()
        return hmac.compare_digest(expected, digest)

    async def fetch_bundle(
        self,
        caller: Principal | None,
        access_key: bytes | None,
        target_id: str,
        device_selector: str,
    ) -> dict[str, Any]:
        service_id = ServiceId.parse(target_id)
        if device_selector == "*":
            wanted: int | None = None
        elif device_selector.isdigit() and 1 <= int(device_selector) <= 127:
            wanted = int(device_selector)
        else:
            raise ServiceError(422, "invalid_device_id", "device id must be 1..127 or *")
        if service_id is None:
            if caller is None:
                raise unauthorized()
            raise ServiceError(404, "not_found", "account not found")
        if service_id.is_pni:
            target = await self.accounts.get_by_pni(service_id.uuid)
        else:
            target = await self.accounts.get_by_aci(service_id.uuid)
        if caller is None:
            target = check_access_key(target, service_id.is_pni, access_key)
        elif target is None:
            raise ServiceError(404, "not_found", "account not found")
        else:
            await self.limiters.check(
                "prekeys", f"{caller.aci}.{caller.device_id}__{service_id.uuid}.{device_selector}"
            )
        identity = "pni" if service_id.is_pni else "aci"
        device_ids = [d.device_id for d in target.devices if wanted is None or d.device_id == wanted]
        if wanted is not None and not device_ids:
            if caller is None:
                raise unauthorized()
            raise ServiceError(404, "not_found", "device not found")
        bundles = await self.keys.take_bundle(target.aci, identity, device_ids)
        if not bundles:
            raise ServiceError(404, "not_found", "no keys for this account")
        identity_key = identity_key_for(target, identity)
        devices_by_id = {d.device_id: d for d in target.devices}
        items = []
        for bundle in bundles:
            device = devices_by_id[bundle.device_id]
            registration_id = device.registration_id if identity == "aci" else device.pni_registration_id
            items.append(
                {
                    "deviceId": bundle.device_id,
                    "registrationId": registration_id,
                    "signedPreKey": _signed_json(bundle.signed_pre_key),
                    "preKey": (
                        {"keyId": bundle.pre_key.key_id, "publicKey": _b64(bundle.pre_key.public_key)}
                        if bundle.pre_key else None
                    ),
                    "pqPreKey": _signed_json(bundle.pq_pre_key),
                }
            )
        return {"identityKey": _b64(identity_key or b""), "devices": items}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _signed_json(key: SignedPreKey) -> dict[str, Any]:
    return {
        "keyId": key.key_id,
        "publicKey": _b64(key.public_key),
        "signature": base64.b64encode(key.signature).decode().rstrip("="),
    }
