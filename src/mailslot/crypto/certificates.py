"""Sealed-sender certificates (digest §7.2): ServerCertificate and SenderCertificate.

The messages are tiny, so they are encoded by hand here rather than through generated protobuf code;
field numbers and wire types follow libsignal's ``sealed_sender.proto``.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from mailslot.crypto import xeddsa

REVOKED_SERVER_KEY_IDS = frozenset({0xDEADC357})

_VARINT, _FIXED64, _BYTES = 0, 1, 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, _BYTES) + _varint(len(data)) + data


def _varint_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + _varint(value)


def _fixed64_field(field: int, value: int) -> bytes:
    return _key(field, _FIXED64) + struct.pack("<Q", value)


def parse_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Minimal protobuf reader (varint, fixed64, length-delimited), for checks and tests."""
    fields: dict[int, list[bytes | int]] = {}
    pos = 0

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = read_varint()
        field, wire_type = key >> 3, key & 7
        value: bytes | int
        if wire_type == _VARINT:
            value = read_varint()
        elif wire_type == _FIXED64:
            if pos + 8 > len(data):
                raise ValueError("truncated fixed64")
            value = struct.unpack_from("<Q", data, pos)[0]
            pos += 8
        elif wire_type == _BYTES:
            length = read_varint()
            if pos + length > len(data):
                raise ValueError("truncated bytes")
            value = data[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields.setdefault(field, []).append(value)
    return fields


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    key_id: int
    public_key: bytes
    serialized: bytes

    @classmethod
    def create(cls, root_private_key: bytes, key_id: int, server_public_key: bytes) -> ServerCertificate:
        if key_id in REVOKED_SERVER_KEY_IDS or not 0 <= key_id < 2**32:
            raise ValueError(f"key id {key_id} cannot be used")
        inner = _varint_field(1, key_id) + _bytes_field(2, server_public_key)
        signature = xeddsa.sign(root_private_key, inner)
        return cls(key_id, server_public_key, _bytes_field(1, inner) + _bytes_field(2, signature))

    @classmethod
    def parse(cls, serialized: bytes, trust_root: bytes | None = None) -> ServerCertificate:
        """Parse, and when a trust root is given check its signature (ValueError if it does not verify)."""
        outer = parse_fields(serialized)
        inner = outer.get(1, [b""])[0]
        signature = outer.get(2, [b""])[0]
        if not isinstance(inner, bytes) or not isinstance(signature, bytes):
            raise ValueError("malformed server certificate")
        fields = parse_fields(inner)
        key_id, public_key = fields.get(1, [None])[0], fields.get(2, [None])[0]
        if not isinstance(key_id, int) or not isinstance(public_key, bytes):
            raise ValueError("malformed server certificate")
        if trust_root is not None and not xeddsa.verify(trust_root, inner, signature):
            raise ValueError("server certificate is not signed by the trust root")
        return cls(key_id, public_key, serialized)


def sender_certificate(
    signer: ServerCertificate,
    signer_private_key: bytes,
    sender_aci: uuid.UUID,
    sender_e164: str | None,
    sender_device: int,
    identity_key: bytes,
    expires_ms: int,
) -> bytes:
    """A SenderCertificate with the signer's full certificate embedded (field 5)."""
    inner = b""
    if sender_e164:
        inner += _bytes_field(1, sender_e164.encode())
    inner += _varint_field(2, sender_device)
    inner += _fixed64_field(3, expires_ms)
    inner += _bytes_field(4, identity_key)
    inner += _bytes_field(5, signer.serialized)
    inner += _bytes_field(7, sender_aci.bytes)
    signature = xeddsa.sign(signer_private_key, inner)
    return _bytes_field(1, inner) + _bytes_field(2, signature)
