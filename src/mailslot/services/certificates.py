"""Sender certificates for sealed sender (digest §7.1)."""

from __future__ import annotations

import time

from mailslot.crypto.certificates import ServerCertificate, sender_certificate
from mailslot.services.credentials import Principal
from mailslot.services.errors import ServiceError

DAY_MS = 86_400_000


class CertificateService:
    """Signs with the newest configured server key; older keys stay listed for rotation only."""

    def __init__(self, trust_root: bytes, signer: ServerCertificate, signer_private_key: bytes, days: int) -> None:
        self.trust_root = trust_root
        self.signer = signer
        self.signer_private_key = signer_private_key
        self.days = days

    def delivery_certificate(self, principal: Principal, include_e164: bool) -> bytes:
        account = principal.account
        if include_e164 and account.number is None:
            raise ServiceError(400, "no_number", "the account has no phone number")
        expires = int(time.time() * 1000) + self.days * DAY_MS
        return sender_certificate(
            self.signer,
            self.signer_private_key,
            account.aci,
            account.number if include_e164 else None,
            principal.device_id,
            account.aci_identity_key,
            expires,
        )
