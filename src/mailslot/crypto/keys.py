"""Byte formats of the public keys clients upload (reference §0.2).

Validators check the serialized form only (type byte and length); whether an EC
key is a usable curve point is decided when a signature is verified with it.
"""

from __future__ import annotations

from typing import Final

EC_KEY_TYPE_DJB: Final = 0x05
"""Type byte of a serialized Curve25519 public key."""
EC_PUBLIC_KEY_LENGTH: Final = 33
"""Type byte plus 32-byte Montgomery u-coordinate."""
EC_PRIVATE_KEY_LENGTH: Final = 32

KEM_KEY_TYPE_KYBER1024: Final = 0x08
KEM_KEY_TYPE_MLKEM1024: Final = 0x0A
KEM_KEY_TYPES: Final = frozenset({KEM_KEY_TYPE_KYBER1024, KEM_KEY_TYPE_MLKEM1024})
KEM_PUBLIC_KEY_LENGTH: Final = 1569
"""Type byte plus 1568 key bytes (the same for Kyber1024 and ML-KEM-1024)."""

SIGNATURE_LENGTH: Final = 64
"""XEdDSA signature length."""


def is_valid_ec_public_key(key: bytes) -> bool:
    """True for a 33-byte serialized Curve25519 public key (0x05 prefix)."""
    return (
        isinstance(key, (bytes, bytearray, memoryview))
        and len(key) == EC_PUBLIC_KEY_LENGTH
        and key[0] == EC_KEY_TYPE_DJB
    )


def is_valid_kem_public_key(key: bytes) -> bool:
    """True for a 1569-byte serialized Kyber1024 (0x08) or ML-KEM-1024 (0x0A) key."""
    return (
        isinstance(key, (bytes, bytearray, memoryview))
        and len(key) == KEM_PUBLIC_KEY_LENGTH
        and key[0] in KEM_KEY_TYPES
    )


def is_valid_signature(signature: bytes) -> bool:
    """True if the value has the length of an XEdDSA signature (64 bytes)."""
    return isinstance(signature, (bytes, bytearray, memoryview)) and len(signature) == SIGNATURE_LENGTH
