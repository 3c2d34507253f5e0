"""XEdDSA (XEd25519) signatures on Curve25519 keys, compatible with libsignal.

Signal identity keys are X25519 (Montgomery) keys, but pre-keys and certificates
are signed with them using XEdDSA: an Ed25519 signature made with the Edwards
form of the same key. The Montgomery form loses the sign of the Edwards
x-coordinate, so libsignal stores that sign bit in the otherwise-unused top bit
of the signature's last byte. Verification here mirrors libsignal's
``PrivateKey::verify_signature``:

* the public key is 0x05 || u; u's top bit is ignored and u is reduced mod p;
  u = -1 is rejected;
* A = (x, y) with y = (u - 1) / (u + 1) and x's sign taken from ``sig[63] >> 7``;
* s is ``sig[32:]`` with that bit cleared; s >= 2**253 is rejected, otherwise s
  is reduced mod L (libsignal accepts a non-canonical s below 2**253);
* the rest is plain Ed25519 verification, delegated to ``cryptography``.

Signing uses the ``xeddsa`` package for the Ed25519 arithmetic on the raw
private scalar and, like libsignal, stores the sign bit of the resulting Edwards
public key in the signature's top bit.
"""

from __future__ import annotations

import secrets
from typing import Final

import xeddsa as _xeddsa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from mailslot.crypto.keys import (
    EC_KEY_TYPE_DJB,
    EC_PRIVATE_KEY_LENGTH,
    EC_PUBLIC_KEY_LENGTH,
    SIGNATURE_LENGTH,
)

__all__ = ["generate_keypair", "public_key_from_private", "sign", "verify"]

_P: Final = 2**255 - 19
"""Field prime of Curve25519 / Ed25519."""
_L: Final = 2**252 + 27742317777372353535851937790883648493
"""Order of the Ed25519 base point."""
_LOW_255_BITS: Final = (1 << 255) - 1
RANDOM_LENGTH: Final = 64
"""Bytes of randomness mixed into each signature's nonce."""

_Bytes = bytes | bytearray | memoryview


def _edwards_public_key(u_bytes: bytes, sign_bit: int) -> bytes | None:
    """Compressed Edwards point for Montgomery ``u`` with the given x sign, or None."""
    u = (int.from_bytes(u_bytes, "little") & _LOW_255_BITS) % _P
    if u == _P - 1:
        return None
    y = (u - 1) * pow(u + 1, -1, _P) % _P
    if y == _P - 1:
        # u = 0 maps to (0, -1); x = 0 has no sign, and libsignal hashes the point's
        # canonical encoding, whose sign bit is 0 whatever the signature said.
        sign_bit = 0
    return (y | (sign_bit << 255)).to_bytes(32, "little")


def verify(identity_key: bytes, message: bytes, signature: bytes) -> bool:
    """Check a libsignal XEdDSA ``signature`` of ``message`` by a 33-byte public key.

    Returns False (never raises) for malformed keys or signatures.
    """
    if not (
        isinstance(identity_key, _Bytes) and isinstance(signature, _Bytes) and isinstance(message, _Bytes)
    ):
        return False
    if len(identity_key) != EC_PUBLIC_KEY_LENGTH or identity_key[0] != EC_KEY_TYPE_DJB:
        return False
    if len(signature) != SIGNATURE_LENGTH:
        return False
    signature = bytes(signature)
    edwards_key = _edwards_public_key(bytes(identity_key[1:]), signature[63] >> 7)
    if edwards_key is None:
        return False
    s = int.from_bytes(signature[32:], "little") & _LOW_255_BITS
    if s >> 253:
        return False
    ed_signature = signature[:32] + (s % _L).to_bytes(32, "little")
    try:
        Ed25519PublicKey.from_public_bytes(edwards_key).verify(ed_signature, bytes(message))
    except (InvalidSignature, ValueError):
        return False
    return True


def _clamp(private_key: bytes) -> bytes:
    if len(private_key) != EC_PRIVATE_KEY_LENGTH:
        raise ValueError(f"private key must be {EC_PRIVATE_KEY_LENGTH} bytes")
    clamped = bytearray(private_key)
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return bytes(clamped)


def sign(private_key: bytes, message: bytes, random: bytes | None = None) -> bytes:
    """XEdDSA-sign ``message`` with a 32-byte Curve25519 private key.

    ``random`` (64 bytes) is the per-signature randomness; it defaults to fresh
    random bytes and only needs to be given for reproducible tests. The key is
    clamped first, as libsignal does on import, so that the signature matches
    :func:`public_key_from_private`.
    """
    if random is None:
        random = secrets.token_bytes(RANDOM_LENGTH)
    elif len(random) != RANDOM_LENGTH:
        raise ValueError(f"random must be {RANDOM_LENGTH} bytes")
    scalar = _clamp(bytes(private_key))
    signature = bytearray(_xeddsa.ed25519_priv_sign(scalar, bytes(message), bytes(random)))
    signature[63] |= _xeddsa.priv_to_ed25519_pub(scalar)[31] & 0x80
    return bytes(signature)


def public_key_from_private(private_key: bytes) -> bytes:
    """The 33-byte serialized (0x05-prefixed) public key of a Curve25519 private key."""
    if len(private_key) != EC_PRIVATE_KEY_LENGTH:
        raise ValueError(f"private key must be {EC_PRIVATE_KEY_LENGTH} bytes")
    u = X25519PrivateKey.from_private_bytes(bytes(private_key)).public_key().public_bytes_raw()
    return bytes([EC_KEY_TYPE_DJB]) + u


def generate_keypair() -> tuple[bytes, bytes]:
    """A new ``(32-byte clamped private key, 33-byte public key)`` pair."""
    private_key = _clamp(secrets.token_bytes(EC_PRIVATE_KEY_LENGTH))
    return private_key, public_key_from_private(private_key)
