"""The set of services one server process runs; built by :mod:`mailslot.wiring`."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailslot.config import Settings
from mailslot.services.accounts import AccountService
from mailslot.services.attachments import AttachmentService
from mailslot.services.blocks import BlockService
from mailslot.services.certificates import CertificateService
from mailslot.services.credentials import Authenticator, TokenService
from mailslot.services.delivery import DeliveryService
from mailslot.services.devices import DeviceService, ProvisioningRegistry
from mailslot.services.groups import GroupService
from mailslot.services.keys import KeyService
from mailslot.services.profiles import ProfileService
from mailslot.services.ratelimit import RateLimiters
from mailslot.services.retention import RetentionJob
from mailslot.services.verification import VerificationService


@dataclass
class Services:
    settings: Settings
    limiters: RateLimiters
    verification: VerificationService
    accounts: AccountService
    tokens: TokenService
    authenticator: Authenticator
    keys: KeyService
    certificates: CertificateService
    delivery: DeliveryService
    devices: DeviceService
    provisioning: ProvisioningRegistry
    groups: GroupService
    blocks: BlockService
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    readiness_checks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    trust_root: str | None = None
    retention: RetentionJob = field(default_factory=RetentionJob)
    # Media (digest §8, §9); None when the configured storage offers no profile store.
    attachments: AttachmentService | None = None
    profiles: ProfileService | None = None

    async def close(self) -> None:
        await self.retention.stop()
        for closer in reversed(self.closers):
            await closer()
