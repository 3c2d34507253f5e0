"""Linked devices (digest §3): link tokens, linking, listing, removal, and the provisioning hand-off."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mailslot.services.accounts import (
    AccountAttributes,
    AccountService,
    known_capabilities,
    new_device,
    verify_signed_keys,
)
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError, invalid
from mailslot.services.ratelimit import RateLimiters
from mailslot.stores.interfaces import AccountStore
from mailslot.stores.models import Device, DeviceKeys, SignedPreKey

MAX_DEVICES = 6
LINK_TOKEN_SECONDS = 600
LINKED_INFO_SECONDS = 3600
MAX_PROVISIONING_BYTES = 256 * 1024


@dataclass(slots=True)
class LinkRequest:
    verification_code: str
    attributes: AccountAttributes
    aci_signed_pre_key: SignedPreKey
    aci_pq_last_resort_pre_key: SignedPreKey
    pni_signed_pre_key: SignedPreKey | None
    pni_pq_last_resort_pre_key: SignedPreKey | None
    apn_token: str | None
    gcm_token: str | None


def _b64url(data: bytes, pad: bool = True) -> str:
    text = base64.urlsafe_b64encode(data).decode()
    return text if pad else text.rstrip("=")


def token_identifier(token: str) -> str:
    return _b64url(hashlib.sha256(token.encode()).digest(), pad=False)


def device_info(device: Device) -> dict[str, Any]:
    """``DeviceInfo`` (§3.1). ``createdAtCiphertext`` (the creation time sealed to the account's identity
    key with libsignal's HPKE construction) is not produced: null."""
    return {
        "id": device.device_id,
        "name": base64.b64encode(device.name).decode() if device.name else None,
        "lastSeen": device.last_seen,
        "registrationId": device.registration_id,
        "createdAtCiphertext": None,
    }


class LinkWaits(Protocol):
    """Where "a device linked with this token" waits for the primary that asked (any node, in a cluster)."""

    async def announce(self, identifier: str, info: dict[str, Any]) -> None: ...

    async def wait(self, identifier: str, wait_seconds: float) -> dict[str, Any] | None: ...


class LocalLinkWaits:
    """In one process: tokenIdentifier → (expiry, DeviceInfo or None, event), kept for an hour."""

    def __init__(self) -> None:
        self._linked: dict[str, tuple[float, dict[str, Any] | None, asyncio.Event]] = {}

    def _entry(self, identifier: str) -> tuple[float, dict[str, Any] | None, asyncio.Event]:
        now = time.monotonic()
        for key in [k for k, (expires, _, _) in self._linked.items() if expires < now]:
            del self._linked[key]
        entry = self._linked.get(identifier)
        if entry is None:
            entry = (now + LINKED_INFO_SECONDS, None, asyncio.Event())
            self._linked[identifier] = entry
        return entry

    async def announce(self, identifier: str, info: dict[str, Any]) -> None:
        expires, _, event = self._entry(identifier)
        self._linked[identifier] = (expires, info, event)
        event.set()

    async def wait(self, identifier: str, wait_seconds: float) -> dict[str, Any] | None:
        _, info, event = self._entry(identifier)
        if info is None:
            try:
                async with asyncio.timeout(wait_seconds):
                    await event.wait()
            except TimeoutError:
                return None
            info = self._linked.get(identifier, (0.0, None, event))[1]
        return info


class DeviceService:
    def __init__(
        self, store: AccountStore, accounts: AccountService, limiters: RateLimiters, link_secret: bytes,
        link_waits: LinkWaits | None = None,
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.limiters = limiters
        self._secret = link_secret
        self.link_waits: LinkWaits = link_waits or LocalLinkWaits()

    # -- link tokens -----------------------------------------------------------------------------

    def _mac(self, payload: str) -> str:
        return _b64url(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest(), pad=False)

    async def provisioning_code(self, principal: Principal) -> dict[str, str]:
        if not principal.device.is_primary:
            raise ServiceError(401, "primary_required", "only the primary device may link devices")
        current = len(principal.account.devices)
        if current >= MAX_DEVICES:
            raise ServiceError(
                411, "device_limit", "device limit reached", body={"current": current, "max": MAX_DEVICES}
            )
        await self.limiters.check("allocateDevice", str(principal.aci))
        payload = f"{principal.aci}.{int(time.time() * 1000)}"
        token = f"{payload}:{self._mac(payload)}"
        return {"verificationCode": token, "tokenIdentifier": token_identifier(token)}

    def _check_token(self, token: str) -> tuple[uuid.UUID, int]:
        payload, sep, mac = token.rpartition(":")
        if not sep or not hmac.compare_digest(self._mac(payload), mac):
            raise ServiceError(403, "invalid_link_token", "the link token is not valid")
        aci_text, _, issued_text = payload.partition(".")
        try:
            aci, issued = uuid.UUID(aci_text), int(issued_text)
        except ValueError as exc:
            raise ServiceError(403, "invalid_link_token", "the link token is not valid") from exc
        if time.time() * 1000 - issued > LINK_TOKEN_SECONDS * 1000:
            raise ServiceError(403, "invalid_link_token", "the link token has expired")
        return aci, issued

    # -- linking ---------------------------------------------------------------------------------

    async def link(self, password: str, request: LinkRequest, user_agent: str | None) -> dict[str, Any]:
        if not password or len(password) > 512:
            raise ServiceError(401, "invalid_credentials", "a password for the new device is required")
        aci, issued = self._check_token(request.verification_code)
        await self.limiters.check("verifyDevice", str(aci))
        account = await self.store.get_by_aci(aci)
        if account is None:
            raise ServiceError(403, "invalid_link_token", "the link token is not valid")
        attrs = request.attributes
        verify_signed_keys(account.aci_identity_key, request.aci_signed_pre_key, [request.aci_pq_last_resort_pre_key])
        has_pni = account.pni_identity_key is not None
        pni_keys = (request.pni_signed_pre_key, request.pni_pq_last_resort_pre_key)
        if has_pni != all(k is not None for k in pni_keys) or has_pni != (attrs.pni_registration_id is not None):
            raise invalid("PNI keys and pniRegistrationId are needed exactly when the account has a PNI identity")
        if has_pni:
            assert account.pni_identity_key is not None and pni_keys[1] is not None
            verify_signed_keys(account.pni_identity_key, pni_keys[0], [pni_keys[1]])
        if attrs.fetches_messages:
            if request.apn_token or request.gcm_token:
                raise invalid("a device that fetches messages takes no push token", "apnToken")
        elif bool(request.apn_token) == bool(request.gcm_token):
            raise invalid("exactly one of apnToken and gcmToken is needed unless fetchesMessages is true")
        if not attrs.capabilities.get("spqr"):
            raise invalid("the spqr capability is required", "accountAttributes.capabilities")
        if len(account.devices) >= MAX_DEVICES:
            raise ServiceError(
                411, "device_limit", "device limit reached", body={"current": len(account.devices), "max": MAX_DEVICES}
            )
        if not await self.store.use_link_token(
            hashlib.sha256(request.verification_code.encode()).hexdigest(), issued // 1000 + LINK_TOKEN_SECONDS
        ):
            raise ServiceError(403, "invalid_link_token", "the link token was already used")
        device = new_device(
            0, password, attrs, user_agent, request.apn_token, request.gcm_token, int(time.time() * 1000)
        )
        keys = [DeviceKeys("aci", request.aci_signed_pre_key, request.aci_pq_last_resort_pre_key)]
        if has_pni and pni_keys[0] is not None and pni_keys[1] is not None:
            keys.append(DeviceKeys("pni", pni_keys[0], pni_keys[1]))
        device_id = await self.store.add_device(aci, device, keys, MAX_DEVICES)
        if device_id is None:
            raise ServiceError(
                411, "device_limit", "device limit reached", body={"current": MAX_DEVICES, "max": MAX_DEVICES}
            )
        await self.link_waits.announce(token_identifier(request.verification_code), device_info(device))
        return {"uuid": str(aci), "pni": str(account.pni) if account.pni else None, "deviceId": device_id}

    async def wait_for_linked_device(
        self, principal: Principal, identifier: str, wait_seconds: float
    ) -> dict[str, Any] | None:
        if not 1 <= len(identifier) <= 64:
            raise ServiceError(400, "bad_request", "malformed token identifier")
        await self.limiters.check("waitForLinkedDevice", str(principal.aci))
        return await self.link_waits.wait(identifier, wait_seconds)

    # -- the device list -------------------------------------------------------------------------

    def list_devices(self, principal: Principal) -> dict[str, Any]:
        return {"devices": [device_info(d) for d in principal.account.devices]}

    async def remove(self, principal: Principal, device_id: int) -> None:
        # The caller's right first (as Signal-Server): a linked device removing any other → 401.
        if not principal.device.is_primary and principal.device_id != device_id:
            raise ServiceError(401, "unauthorized", "a linked device may remove only itself")
        if device_id == 1:
            raise ServiceError(403, "forbidden", "the primary device cannot be removed")
        if not await self.store.remove_device(principal.aci, device_id):
            raise ServiceError(404, "not_found", "no such device")
        await self.accounts.disconnect(principal.aci, [device_id])

    async def set_capabilities(self, principal: Principal, capabilities: dict[str, bool]) -> None:
        principal.device.capabilities = known_capabilities(capabilities)
        await self.store.update_device(principal.aci, principal.device)

    async def set_name(self, principal: Principal, device_id: int | None, name: bytes) -> None:
        target_id = principal.device_id if device_id is None else device_id
        if target_id != principal.device_id and not principal.device.is_primary:
            raise ServiceError(403, "forbidden", "a linked device may rename only itself")
        device = principal.account.device(target_id)
        if device is None:
            raise ServiceError(404, "not_found", "no such device")
        device.name = name
        await self.store.update_device(principal.aci, device)


Deliver = Callable[[bytes], Awaitable[bool]]


class ProvisioningRegistry:
    """Provisioning addresses of the sockets connected to this process (the in-process bus).

    In a cluster a subclass also listens on a Redis channel per address, so the new device's socket
    and the primary's ``PUT /v1/provisioning/{address}`` may reach different nodes.
    """

    def __init__(self) -> None:
        self._listeners: dict[str, Deliver] = {}

    def new_address(self, deliver: Deliver) -> str:
        address = _b64url(secrets.token_bytes(16))
        self._listeners[address] = deliver
        return address

    async def settle(self, address: str) -> None:
        """Wait until the address can be reached (at once here; a subscription in a cluster)."""

    def release(self, address: str) -> None:
        self._listeners.pop(address, None)

    async def forward(self, address: str, envelope: bytes) -> bool:
        """Hand the message to the socket listening on ``address``; False when nobody listens."""
        deliver = self._listeners.get(address)
        return deliver is not None and await deliver(envelope)

    async def send(self, principal: Principal, limiters: RateLimiters, address: str, body_b64: str) -> None:
        await limiters.check("messages", str(principal.aci))
        try:
            envelope = base64.b64decode("".join(body_b64.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ServiceError(422, "invalid_request", "body: invalid base64") from exc
        if len(envelope) > MAX_PROVISIONING_BYTES:
            raise ServiceError(400, "too_large", "provisioning message is too large")
        if not await self.forward(address, envelope):
            raise ServiceError(404, "not_found", "nobody is listening on that provisioning address")
