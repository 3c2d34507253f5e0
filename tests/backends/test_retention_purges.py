"""The retention job's purges against real storage (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
import uuid

from mailslot.config import Settings
from mailslot.stores.models import RefreshToken, VerificationSession
from mailslot.wiring import build_services
from tests.backends.support import insert_account


async def test_expired_sessions_and_refresh_tokens_are_purged(settings: Settings) -> None:
    services = await build_services(settings)
    try:
        now = int(time.time())
        sessions = services.verification.store
        for session_id, expires in (("old", now - 10), ("live", now + 600)):
            await sessions.insert(VerificationSession(id=session_id, number="+15555550001", created_at=now,
                                                      updated_at=now, expires_at=expires))
        # Refresh tokens reference an account, so make one through the registration rules' store.
        aci = uuid.uuid4()
        await insert_account(services, aci)
        tokens = services.tokens._refresh_store
        await tokens.insert(RefreshToken("spent-old", "fam", aci, 1, now - 10, True))
        await tokens.insert(RefreshToken("fresh", "fam", aci, 1, now + 600, False))

        deleted = await services.retention.run_once()

        assert deleted["verification_sessions"] == 1 and deleted["refresh_tokens"] == 1
        assert await sessions.get("old") is None and await sessions.get("live") is not None
        assert await tokens.mark_used(aci, "spent-old") is None
        assert await tokens.mark_used(aci, "fresh") is not None
    finally:
        await services.close()
