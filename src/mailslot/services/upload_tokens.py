"""Upload tokens for the built-in tus endpoint (digest §9, cdn 3).

An HS256 JWT ``{aud: "attachments", sub: <key>, maxLen, iat, exp}`` signed with a secret of its own:
a session token (other secret, other audience) never passes here, and an upload token never passes
as a session token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

UPLOAD_AUDIENCE = "attachments"


@dataclass(frozen=True, slots=True)
class UploadGrant:
    key: str
    max_length: int


class UploadTokens:
    def __init__(self, secret: bytes, lifetime_seconds: int) -> None:
        self._secret = secret
        self.lifetime = lifetime_seconds

    def issue(self, key: str, max_length: int) -> str:
        now = int(time.time())
        claims = {"aud": UPLOAD_AUDIENCE, "sub": key, "maxLen": max_length, "iat": now, "exp": now + self.lifetime}
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def verify(self, token: str) -> UploadGrant | None:
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"], audience=UPLOAD_AUDIENCE,
                                options={"require": ["exp", "sub", "maxLen", "aud"]})
        except jwt.PyJWTError:
            return None
        key, max_length = claims.get("sub"), claims.get("maxLen")
        if not isinstance(key, str) or not isinstance(max_length, int) or isinstance(max_length, bool):
            return None
        return UploadGrant(key, max_length)
