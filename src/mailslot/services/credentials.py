"""Device credentials (HTTP Basic, salted-HKDF hashes) and JWT session tokens."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import jwt

from mailslot.crypto import tokenhash
from mailslot.stores.interfaces import RefreshTokenStore
from mailslot.stores.models import Account, Device, RefreshToken

ACCESS_AUDIENCE = "mailslot-session"
REFRESH_AUDIENCE = "mailslot-refresh"
DAY_MS = 86_400_000


@dataclass(slots=True)
class Principal:
    """An authenticated device, with the account as it was loaded for this request."""

    account: Account
    device: Device

    @property
    def aci(self) -> uuid.UUID:
        return self.account.aci

    @property
    def device_id(self) -> int:
        return self.device.device_id


class AuthenticationFailed(Exception):
    pass


def parse_basic(header_value: str) -> tuple[str, str] | None:
    """``Basic base64(user:pass)`` → (user, pass), or None when malformed."""
    scheme, _, encoded = header_value.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def parse_device_username(username: str) -> tuple[uuid.UUID, int] | None:
    """``aci`` or ``aci.deviceId`` → (aci, deviceId)."""
    aci_text, sep, device_text = username.partition(".")
    try:
        aci = uuid.UUID(aci_text)
    except ValueError:
        return None
    if len(aci_text) != 36:
        return None
    if not sep:
        return aci, 1
    if not device_text.isdigit() or not 1 <= int(device_text) <= 127:
        return None
    return aci, int(device_text)


class AccountLookup(Protocol):
    """What the authenticator needs from the account service (kept narrow to avoid a cycle)."""

    async def get_by_aci(self, aci: uuid.UUID) -> Account | None: ...

    async def touch_device(self, aci: uuid.UUID, device_id: int, last_seen: int) -> None: ...


class TokenService:
    """Access tokens (1 h) and rotating refresh tokens (30 d) bound to a device's token generation.

    A device's ``token_generation`` is fixed when the device is created, so re-registration (a new
    device row) or removal invalidates every token issued before at once.
    """

    def __init__(
        self, secret: bytes, refresh_store: RefreshTokenStore, access_seconds: int, refresh_seconds: int
    ) -> None:
        self._secret = secret
        self._refresh_store = refresh_store
        self.access_seconds = access_seconds
        self.refresh_seconds = refresh_seconds

    def _encode(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def decode_access(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._secret, algorithms=["HS256"], audience=ACCESS_AUDIENCE,
                options={"require": ["exp", "sub", "dev", "gen"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed("invalid access token") from exc
        return claims

    async def issue(self, aci: uuid.UUID, device: Device, family_id: str | None = None) -> dict[str, Any]:
        now = int(time.time())
        family = family_id or secrets.token_hex(16)
        refresh_id = secrets.token_hex(16)
        access = self._encode(
            {
                "aud": ACCESS_AUDIENCE, "sub": str(aci), "dev": device.device_id,
                "gen": device.token_generation, "iat": now, "exp": now + self.access_seconds,
            }
        )
        refresh = self._encode(
            {
                "aud": REFRESH_AUDIENCE, "sub": str(aci), "dev": device.device_id, "jti": refresh_id,
                "fam": family, "iat": now, "exp": now + self.refresh_seconds,
            }
        )
        await self._refresh_store.insert(
            RefreshToken(refresh_id, family, aci, device.device_id, now + self.refresh_seconds, False)
        )
        return {"accessToken": access, "refreshToken": refresh, "expiresIn": self.access_seconds}

    async def rotate(self, refresh_token: str, accounts: AccountLookup) -> dict[str, Any]:
        try:
            claims = jwt.decode(
                refresh_token, self._secret, algorithms=["HS256"], audience=REFRESH_AUDIENCE,
                options={"require": ["exp", "sub", "dev", "jti", "fam"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationFailed("invalid refresh token") from exc
        try:
            subject = uuid.UUID(str(claims["sub"]))
        except ValueError as exc:
            raise AuthenticationFailed("invalid refresh token") from exc
        stored = await self._refresh_store.mark_used(subject, str(claims["jti"]))
        if stored is None:
            raise AuthenticationFailed("unknown refresh token")
        if stored.used:
            # A spent token came back: someone holds a copy. End the whole family.
            await self._refresh_store.revoke_family(subject, stored.family_id)
            raise AuthenticationFailed("refresh token reused")
        account = await accounts.get_by_aci(stored.aci)
        device = account.device(stored.device_id) if account else None
        if account is None or device is None:
            raise AuthenticationFailed("device no longer exists")
        return await self.issue(account.aci, device, family_id=stored.family_id)


class Authenticator:
    def __init__(self, accounts: AccountLookup, tokens: TokenService) -> None:
        self.accounts = accounts
        self.tokens = tokens

    async def _touch(self, account: Account, device: Device) -> None:
        now_ms = int(time.time() * 1000)
        today = now_ms - now_ms % DAY_MS
        if device.last_seen < today:
            # Last-seen is kept to the day only (privacy): write at most once a day.
            device.last_seen = today
            await self.accounts.touch_device(account.aci, device.device_id, today)

    async def authenticate_password(self, username: str, password: str) -> Principal | None:
        parsed = parse_device_username(username)
        if parsed is None:
            return None
        aci, device_id = parsed
        account = await self.accounts.get_by_aci(aci)
        device = account.device(device_id) if account else None
        if account is None or device is None:
            return None
        if not tokenhash.verify(password, device.auth_hash, device.auth_salt):
            return None
        await self._touch(account, device)
        return Principal(account, device)

    async def authenticate_basic(self, header_value: str) -> Principal | None:
        credentials = parse_basic(header_value)
        if credentials is None:
            return None
        return await self.authenticate_password(*credentials)

    async def authenticate_bearer(self, token: str) -> Principal | None:
        try:
            claims = self.tokens.decode_access(token)
            aci = uuid.UUID(str(claims["sub"]))
            device_id = int(claims["dev"])
        except (AuthenticationFailed, ValueError, TypeError):
            return None
        account = await self.accounts.get_by_aci(aci)
        device = account.device(device_id) if account else None
        if account is None or device is None or device.token_generation != claims["gen"]:
            return None
        if device.auth_hash.startswith("!"):
            return None
        await self._touch(account, device)
        return Principal(account, device)

    async def authenticate_header(self, header_value: str) -> Principal | None:
        scheme, _, rest = header_value.strip().partition(" ")
        if scheme.lower() == "bearer":
            return await self.authenticate_bearer(rest.strip())
        return await self.authenticate_basic(header_value)
