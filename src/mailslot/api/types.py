"""Request/response field types shared by the routers (base64 conventions of digest §0.2)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema


def _decode_b64(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, list):
        # Jackson reads byte[] from an array of numbers too, and libsignal sends some fields that way.
        if not all(isinstance(b, int) and not isinstance(b, bool) and -128 <= b <= 255 for b in value):
            raise ValueError("must be base64 or an array of bytes")
        return bytes(b & 0xFF for b in value)
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    text = value.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid base64") from exc


def _encode_padded(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _encode_unpadded(value: bytes) -> str:
    return base64.b64encode(value).decode().rstrip("=")


_B64_SCHEMA = WithJsonSchema({"type": "string", "format": "byte", "description": "standard base64"})

# Input accepts padded or unpadded standard base64; output keeps the digest's convention per field.
Base64 = Annotated[bytes, BeforeValidator(_decode_b64), PlainSerializer(_encode_padded), _B64_SCHEMA]
Base64Unpadded = Annotated[bytes, BeforeValidator(_decode_b64), PlainSerializer(_encode_unpadded), _B64_SCHEMA]


class WireModel(BaseModel):
    """Unknown JSON properties are ignored, as Signal's server does."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def decode_base64_header(value: str) -> bytes | None:
    """Standard base64 with or without padding (as Java's decoder reads headers); None if malformed."""
    try:
        return _decode_b64(value)
    except ValueError:
        return None


def b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def b64_unpadded(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode().rstrip("=")
