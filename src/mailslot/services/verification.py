"""Verification sessions (digest §1.1): prove control of a phone number with a 6-digit code."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from mailslot.config import RegistrationSettings
from mailslot.services.errors import ServiceError, not_found
from mailslot.services.phone import normalize_number
from mailslot.services.ratelimit import RateLimiters
from mailslot.services.sms import CodeSender, SenderError, Transport
from mailslot.stores.interfaces import VerificationSessionStore
from mailslot.stores.models import VerificationSession

log = logging.getLogger("mailslot.verification")


def _now() -> int:
    return int(time.time())


_SESSION_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]+={0,2}")


def decode_session_id(session_id: str) -> bytes:
    """Session ids are URL-safe base64 (padded); anything else is malformed (422).

    The check is strict: a lenient decoder skips characters outside the alphabet, which would let
    arbitrary text (NUL bytes included, which PostgreSQL refuses) through to the store.
    """
    if not _SESSION_ID_SHAPE.fullmatch(session_id):
        raise ServiceError(422, "invalid_session_id", "session id is malformed")
    try:
        raw = base64.urlsafe_b64decode(session_id.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ServiceError(422, "invalid_session_id", "session id is malformed") from exc
    if len(raw) != 32:
        raise ServiceError(422, "invalid_session_id", "session id is malformed")
    return raw


@dataclass(slots=True)
class SessionView:
    """The wire shape of a session (``VerificationSessionResponse``)."""

    session: VerificationSession
    next_sms: int | None
    next_call: int | None
    next_verification_attempt: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.session.id,
            "nextSms": self.next_sms,
            "nextCall": self.next_call,
            "nextVerificationAttempt": self.next_verification_attempt,
            # False once no transport may send another code: the client must start a new session.
            "allowedToRequestCode": self.next_sms is not None or self.next_call is not None,
            "requestedInformation": [],
            "verified": self.session.verified,
        }


# How often a request re-reads a session that a concurrent request changed before giving up.
CONCURRENT_TRIES = 5


class VerificationService:
    def __init__(
        self,
        store: VerificationSessionStore,
        sender: CodeSender,
        limiters: RateLimiters,
        settings: RegistrationSettings,
    ) -> None:
        self.store = store
        self.sender = sender
        self.limiters = limiters
        self.settings = settings

    def _code_hash(self, session_id: str, code: str) -> str:
        return hashlib.sha256(f"{session_id}:{code}".encode()).hexdigest()

    def view(self, session: VerificationSession) -> SessionView:
        now = _now()
        if session.verified:
            return SessionView(session, None, None, None)
        exhausted = session.code_requests >= self.settings.max_code_requests

        def wait(last: int | None, interval: int) -> int | None:
            if exhausted:
                return None
            if last is None:
                return 0
            return max(0, last + interval - now)

        code_live = (
            session.code_hash is not None
            and session.code_expires_at is not None
            and session.code_expires_at > now
            and session.code_attempts < self.settings.max_code_attempts
        )
        return SessionView(
            session,
            wait(session.last_sms_at, self.settings.sms_resend_seconds),
            wait(session.last_call_at, self.settings.call_resend_seconds),
            0 if code_live else None,
        )

    async def _load(self, session_id: str) -> VerificationSession:
        decode_session_id(session_id)
        session = await self.store.get(session_id)
        if session is None or session.expires_at <= _now():
            raise not_found("verification session")
        return session

    async def create(
        self, number: str, client_ip: str, push_token: str | None, push_token_type: str | None
    ) -> SessionView:
        normalized = normalize_number(number, self.settings.test_numbers)
        await self.limiters.check("verificationSessionPerIp", client_ip)
        await self.limiters.check("verificationSessionPerNumber", normalized)
        now = _now()
        session = VerificationSession(
            id=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            number=normalized,
            created_at=now,
            updated_at=now,
            expires_at=now + self.settings.session_ttl_seconds,
            push_token=push_token,
            push_token_type=push_token_type,
        )
        await self.store.insert(session)
        return self.view(session)

    async def get(self, session_id: str) -> SessionView:
        return self.view(await self._load(session_id))

    async def update(
        self, session_id: str, push_token: str | None, push_token_type: str | None
    ) -> SessionView:
        session = await self._load(session_id)
        if push_token is not None:
            session.push_token = push_token
            session.push_token_type = push_token_type
            session.updated_at = _now()
            # Only the push fields are written: a whole-row write could undo concurrent code accounting.
            await self.store.compare_and_set(
                session.id, {}, {"push_token": push_token, "push_token_type": push_token_type,
                                 "updated_at": session.updated_at},
            )
        return self.view(session)

    async def request_code(self, session_id: str, transport: Transport, locale: str | None) -> SessionView:
        for _ in range(CONCURRENT_TRIES):
            session = await self._load(session_id)
            if session.verified:
                raise ServiceError(409, "already_verified", "session is already verified",
                                   body=self.view(session).to_json())
            current = self.view(session)
            wait = current.next_sms if transport == "sms" else current.next_call
            if wait is None:
                raise ServiceError(429, "code_requests_exhausted", "no more codes can be sent for this session",
                                   body=current.to_json())
            if wait > 0:
                raise ServiceError(429, "too_soon", "wait before requesting another code",
                                   body=current.to_json(), headers={"Retry-After": str(wait)})
            now = _now()
            last_column = "last_sms_at" if transport == "sms" else "last_call_at"
            previous_last = session.last_sms_at if transport == "sms" else session.last_call_at
            seen = session.code_requests
            # Claim the request before sending: of concurrent requests only one gets past this point, so
            # the resend wait and the cap on codes hold (no SMS pumping by parallel requests).
            if await self.store.compare_and_set(
                session.id, {"code_requests": seen, "verified": False},
                {"code_requests": seen + 1, last_column: now, "updated_at": now},
            ):
                break
        else:
            raise ServiceError(429, "too_soon", "wait before requesting another code",
                               body=self.view(await self._load(session_id)).to_json(), headers={"Retry-After": "1"})
        test_code = self.settings.test_numbers.get(session.number)
        code = test_code if test_code is not None else f"{secrets.randbelow(1_000_000):06d}"
        if test_code is None:
            try:
                await self.sender.send(session.number, code, transport, session.id, locale)
            except SenderError as exc:
                # Nothing was sent: give the claimed request back.
                await self.store.compare_and_set(
                    session.id, {"code_requests": seen + 1}, {"code_requests": seen, last_column: previous_last},
                )
                raise ServiceError(
                    440, "provider_error", "the code could not be sent",
                    body={"reason": exc.reason, "permanentFailure": exc.permanent},
                ) from exc
        session.code_hash = self._code_hash(session.id, code)
        session.code_expires_at = now + self.settings.code_ttl_seconds
        session.code_attempts = 0
        session.code_requests = seen + 1
        if transport == "sms":
            session.last_sms_at = now
        else:
            session.last_call_at = now
        session.updated_at = now
        # Unless a later request has claimed the session since (its code then wins).
        await self.store.compare_and_set(
            session.id, {"code_requests": seen + 1},
            {"code_hash": session.code_hash, "code_expires_at": session.code_expires_at, "code_attempts": 0},
        )
        return self.view(session)

    async def submit_code(self, session_id: str, code: str) -> SessionView:
        for _ in range(self.settings.max_code_attempts + CONCURRENT_TRIES):
            session = await self._load(session_id)
            if session.verified:
                return self.view(session)
            if session.code_hash is None:
                raise ServiceError(409, "no_code_requested", "no code was requested for this session",
                                   body=self.view(session).to_json())
            now = _now()
            if session.code_attempts >= self.settings.max_code_attempts:
                raise ServiceError(429, "too_many_attempts", "too many wrong codes; request a new one",
                                   body=self.view(session).to_json())
            if session.code_expires_at is None or session.code_expires_at <= now:
                return self.view(session)
            # Count the attempt before judging the code, atomically: concurrent guesses each need an
            # attempt of their own, so no more than ``max_code_attempts`` codes are ever compared.
            if not await self.store.compare_and_set(
                session.id,
                {"code_hash": session.code_hash, "code_attempts": session.code_attempts, "verified": False},
                {"code_attempts": session.code_attempts + 1, "updated_at": now},
            ):
                continue
            session.code_attempts += 1
            if hmac.compare_digest(self._code_hash(session.id, code), session.code_hash):
                if await self.store.compare_and_set(
                    session.id, {"code_hash": session.code_hash, "verified": False},
                    {"verified": True, "code_hash": None, "updated_at": now},
                ):
                    session.verified = True
                    session.code_hash = None
                else:  # a new code replaced this one meanwhile
                    session = await self._load(session_id)
            return self.view(session)
        raise ServiceError(429, "too_many_attempts", "too many concurrent attempts; try again",
                           headers={"Retry-After": "1"})

    async def verified_number(self, session_id: str) -> str:
        """The number a session proved, for registration: 400 bad id, 401 not verified."""
        try:
            session = await self._load(session_id)
        except ServiceError as exc:
            raise ServiceError(400, "invalid_session", "verification session is invalid") from exc
        if not session.verified:
            raise ServiceError(401, "session_not_verified", "verification session is not verified")
        return session.number
