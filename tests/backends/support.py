"""Store-level helpers for backend tests."""

from __future__ import annotations

import secrets
import time
import uuid

from mailslot.crypto import xeddsa
from mailslot.services.container import Services
from mailslot.stores.models import Account, Device


async def insert_account(services: Services, aci: uuid.UUID, number: str | None = None) -> Account:
    """A minimal account with a primary device, written straight to the store."""
    now = int(time.time() * 1000)
    account = Account(
        aci=aci, number=number or f"+1555{secrets.randbelow(10**7):07d}", pni=uuid.uuid4(),
        aci_identity_key=xeddsa.generate_keypair()[1], pni_identity_key=xeddsa.generate_keypair()[1],
        unidentified_access_key=secrets.token_bytes(16), unrestricted_unidentified_access=False,
        discoverable_by_phone_number=True, created_at=now,
    )
    device = Device(device_id=1, auth_hash="2.x", auth_salt="00", registration_id=1, pni_registration_id=2,
                    name=None, fetches_messages=True, capabilities={}, created_at=now, last_seen=now,
                    token_generation=secrets.token_hex(8))
    await services.accounts.store.create_or_replace(account, device, [], reclaimed=False)
    return account
