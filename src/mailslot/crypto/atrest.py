"""At-rest encryption of stored envelopes: AES-256-GCM under a rotating keyring.

A sealed value is ``key_id (u16, big-endian) ‖ nonce (12 random bytes) ‖ ciphertext ‖ tag (16)``,
30 bytes longer than the plaintext. The key id selects the key on open, so a keyring holding the
old keys still opens everything written before a rotation while new seals use ``current``.

The caller's associated data (e.g. account id ‖ device id ‖ guid) is authenticated together with
the key-id header, so a ciphertext copied into another row, or relabelled with another key id,
fails to open. Associated data should be unambiguous: fixed-width fields, or length-prefixed ones.

Random 96-bit nonces are safe for about 2**32 seals per key; rotate long before that.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_LENGTH: Final = 32
NONCE_LENGTH: Final = 12
TAG_LENGTH: Final = 16
KEY_ID_LENGTH: Final = 2
MAX_KEY_ID: Final = 0xFFFF
HEADER_LENGTH: Final = KEY_ID_LENGTH + NONCE_LENGTH
OVERHEAD: Final = HEADER_LENGTH + TAG_LENGTH
"""Bytes a sealed value adds to its plaintext."""


class AtRestError(ValueError):
    """Base class of this module's errors."""


class UnknownKeyId(AtRestError):
    """The sealed value names a key the keyring does not hold (retired too early, or garbage)."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"no at-rest key with id {key_id}")
        self.key_id = key_id


class SealedDataCorrupt(AtRestError):
    """The value fails authentication: tampered, truncated, or opened with the wrong associated data."""


class InvalidKeyConfig(AtRestError):
    """The keyring configuration is unusable; messages never contain key material."""


def _check_key_id(key_id: object) -> int:
    if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= MAX_KEY_ID:
        raise InvalidKeyConfig(f"key id must be an integer in 0..{MAX_KEY_ID}, got {key_id!r}")
    return key_id


class AtRestKeyring:
    """The at-rest keys by id; ``current`` is the one new seals use."""

    __slots__ = ("_ciphers", "current")

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        if not keys:
            raise InvalidKeyConfig("the keyring needs at least one key")
        ciphers: dict[int, AESGCM] = {}
        for key_id, key in keys.items():
            _check_key_id(key_id)
            if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LENGTH:
                length = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
                raise InvalidKeyConfig(f"key {key_id}: must be {KEY_LENGTH} bytes, got {length}")
            ciphers[key_id] = AESGCM(bytes(key))
        if _check_key_id(current) not in ciphers:
            raise InvalidKeyConfig(f"current key id {current} is not in the keyring")
        self._ciphers = ciphers
        self.current = current

    def __repr__(self) -> str:
        return f"AtRestKeyring(key_ids={sorted(self._ciphers)}, current={self.current})"

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(self._ciphers)

    def seal(self, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt ``plaintext`` under the current key, bound to ``associated_data``."""
        header = self.current.to_bytes(KEY_ID_LENGTH, "big")
        nonce = os.urandom(NONCE_LENGTH)
        sealed = self._ciphers[self.current].encrypt(nonce, plaintext, header + associated_data)
        return header + nonce + sealed

    def open(self, sealed: bytes, associated_data: bytes) -> bytes:
        """Decrypt a value made by :meth:`seal` with the same ``associated_data``."""
        if len(sealed) < OVERHEAD:
            raise SealedDataCorrupt(f"sealed value is {len(sealed)} bytes, shorter than the {OVERHEAD}-byte minimum")
        key_id = self.key_id_of(sealed)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownKeyId(key_id)
        header = sealed[:KEY_ID_LENGTH]
        nonce = sealed[KEY_ID_LENGTH:HEADER_LENGTH]
        try:
            return cipher.decrypt(nonce, sealed[HEADER_LENGTH:], bytes(header) + associated_data)
        except InvalidTag:
            raise SealedDataCorrupt(
                f"sealed value under key {key_id} failed authentication (tampered, or wrong associated data)"
            ) from None

    def needs_reseal(self, sealed: bytes) -> bool:
        """True if ``sealed`` was made under a key other than the current one."""
        return self.key_id_of(sealed) != self.current

    def reseal(self, sealed: bytes, associated_data: bytes) -> bytes:
        """Re-encrypt under the current key (for migrating rows off a retiring key)."""
        if not self.needs_reseal(sealed):
            return sealed
        return self.seal(self.open(sealed, associated_data), associated_data)

    @staticmethod
    def key_id_of(sealed: bytes) -> int:
        """The key id a sealed value names, without decrypting it."""
        if len(sealed) < KEY_ID_LENGTH:
            raise SealedDataCorrupt("sealed value is too short to hold a key id")
        return int.from_bytes(sealed[:KEY_ID_LENGTH], "big")


def _decode_key(key_id: int, text: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidKeyConfig(f"key {key_id}: expected base64 text, got {type(text).__name__}")
    cleaned = text.strip().translate(str.maketrans("-_", "+/"))
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        key = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKeyConfig(f"key {key_id}: not valid base64") from None
    if len(key) != KEY_LENGTH:
        raise InvalidKeyConfig(f"key {key_id}: must decode to {KEY_LENGTH} bytes, got {len(key)}")
    return key


def keyring_from_config(entries: Sequence[str] | Mapping[int, str], current: int | None = None) -> AtRestKeyring:
    """Build a keyring from configuration.

    ``entries`` is either a mapping ``{key id: base64 key}`` or a list of ``"ID:BASE64"`` strings (ids
    are explicit because a key's id is written into every value sealed with it, so renumbering would
    orphan data). Standard and URL-safe base64 are accepted, padding optional; every key must
    decode to 32 bytes. ``current`` defaults to the highest id.
    """
    pairs: list[tuple[int, str]] = []
    if isinstance(entries, Mapping):
        pairs = [(_check_key_id(key_id), text) for key_id, text in entries.items()]
    elif isinstance(entries, str):
        raise InvalidKeyConfig('expected a list of "ID:BASE64" entries or a mapping, got a single string')
    else:
        for position, entry in enumerate(entries):
            if not isinstance(entry, str):
                raise InvalidKeyConfig(f"entry #{position}: expected an \"ID:BASE64\" string")
            id_text, sep, text = entry.partition(":")
            if not sep or not id_text.strip().isdigit() or not id_text.strip().isascii():
                raise InvalidKeyConfig(f'entry #{position}: expected "ID:BASE64" with a decimal id')
            pairs.append((_check_key_id(int(id_text)), text))
    keys: dict[int, bytes] = {}
    for key_id, text in pairs:
        if key_id in keys:
            raise InvalidKeyConfig(f"key id {key_id} is configured twice")
        keys[key_id] = _decode_key(key_id, text)
    if not keys:
        raise InvalidKeyConfig("no at-rest keys configured")
    return AtRestKeyring(keys, max(keys) if current is None else current)
