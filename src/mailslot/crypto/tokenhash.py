"""Salted hashes of device passwords and similar secrets (reference §2.2).

Format compatible with Signal-Server's ``SaltedTokenHash`` so stored credentials
are portable: salt = 16 random bytes as 32 lowercase hex chars; hash = ``"2."`` +
hex(HKDF-SHA256(ikm=token, salt=salt *as its hex text*, info="authtoken", L=32)).
A hash prefixed with ``"!"`` is a locked credential and never matches.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HASH_PREFIX: Final = "2."
LOCKED_PREFIX: Final = "!"
SALT_BYTES: Final = 16
_INFO: Final = b"authtoken"


def _derive(token: str, salt: str) -> str:
    kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt.encode(), info=_INFO)
    return HASH_PREFIX + kdf.derive(token.encode()).hex()


def generate(token: str) -> tuple[str, str]:
    """Hash a new secret; returns ``(hash, salt)`` for storage."""
    salt = secrets.token_hex(SALT_BYTES)
    return _derive(token, salt), salt


def verify(token: str, stored_hash: str, salt: str) -> bool:
    """Constant-time check of ``token`` against a stored ``(hash, salt)`` pair.

    Only the current ("2.") format is accepted; locked ("!") and legacy hashes never match.
    """
    if not stored_hash.startswith(HASH_PREFIX):
        return False
    try:
        candidate = _derive(token, salt)
    except UnicodeEncodeError:  # lone surrogates cannot be hashed, so cannot match
        return False
    return hmac.compare_digest(candidate.encode(), stored_hash.encode())
