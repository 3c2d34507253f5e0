"""Group-Auth (GROUPS.md): Ed25519 signatures by per-group member keys over one request.

The signed bytes are ``"mailslot-group-v1" ‖ group id (32) ‖ method ‖ 0x00 ‖ path?query ‖ 0x00 ‖
unix ms (8, big-endian) ‖ SHA-256(body)``. Both the server and the client reference module
(:mod:`mailslot.client.groups`) build them here, so the two cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CONTEXT = b"mailslot-group-v1"
HEADER = "Group-Auth"
KEY_BYTES = 32
SIGNATURE_BYTES = 64


def signing_input(group_id: bytes, method: str, path: str, timestamp_ms: int, body: bytes) -> bytes:
    return b"".join((
        CONTEXT, group_id, method.upper().encode("ascii"), b"\x00", path.encode("ascii"), b"\x00",
        struct.pack(">Q", timestamp_ms), hashlib.sha256(body).digest(),
    ))


@dataclass(frozen=True, slots=True)
class GroupAuth:
    public_key: bytes
    timestamp_ms: int
    signature: bytes

    def verify(self, group_id: bytes, method: str, path: str, body: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(
                self.signature, signing_input(group_id, method, path, self.timestamp_ms, body)
            )
        except (InvalidSignature, ValueError):
            return False
        return True


def parse_header(value: str) -> GroupAuth | None:
    """``<key b64>.<unix ms>.<signature b64>``, or None when malformed."""
    parts = value.strip().split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 15:
        return None
    try:
        key = base64.b64decode(parts[0], validate=True)
        signature = base64.b64decode(parts[2], validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(key) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return None
    return GroupAuth(key, int(parts[1]), signature)


def make_header(private_key: Ed25519PrivateKey, group_id: bytes, method: str, path: str, timestamp_ms: int,
                body: bytes = b"") -> str:
    public = private_key.public_key().public_bytes_raw()
    signature = private_key.sign(signing_input(group_id, method, path, timestamp_ms, body))
    return f"{base64.b64encode(public).decode()}.{timestamp_ms}.{base64.b64encode(signature).decode()}"
