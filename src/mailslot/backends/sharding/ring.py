"""A consistent-hash ring over the shards ``shard-0``, ``shard-1``, … of ``[storage] urls``.

A shard's label is its position in ``urls``, so the order of that list matters: operators only ever
append a new URL at the end (then run ``mailslot shards rebalance``). Removing or reordering URLs is not
supported, it would relabel shards and strand their rows.

Each shard owns many points (virtual nodes) on a 64-bit circle; a key belongs to the shard owning the
first point at or after the key's hash. Adding shard N adds only N's points, so a key either stays where
it was or moves to the new shard: about 1/(N+1) of the keys move. Hashes are SHA-256 based (stable
across processes and Python versions, unlike :func:`hash`).
"""

from __future__ import annotations

import bisect
import hashlib
import uuid

VIRTUAL_NODES = 256

Key = str | bytes | uuid.UUID


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def _key_bytes(key: Key) -> bytes:
    # A UUID hashes by its 16 bytes; ids are always passed as UUIDs (never as their strings).
    if isinstance(key, uuid.UUID):
        return key.bytes
    if isinstance(key, str):
        return key.encode()
    return bytes(key)


def shard_label(index: int) -> str:
    return f"shard-{index}"


class HashRing:
    def __init__(self, shards: int, vnodes: int = VIRTUAL_NODES) -> None:
        if shards < 1:
            raise ValueError("a ring needs at least one shard")
        self.shards = shards
        points = sorted(
            (_hash(f"{shard_label(shard)}#{vnode}".encode()), shard)
            for shard in range(shards)
            for vnode in range(vnodes)
        )
        self._hashes = [h for h, _ in points]
        self._owners = [s for _, s in points]

    def shard_for(self, key: Key) -> int:
        """The index of the shard that holds ``key``."""
        if self.shards == 1:
            return 0
        position = bisect.bisect_left(self._hashes, _hash(_key_bytes(key)))
        return self._owners[position % len(self._owners)]


# Keys of the rows not keyed by an account id: each lives on the shard of its own key.


def number_key(number: str) -> str:
    """The directory entry and the PNI allocation of a phone number."""
    return f"number:{number}"


def pni_key(pni: uuid.UUID) -> str:
    return f"pni:{pni}"


def session_key(session_id: str) -> str:
    return f"session:{session_id}"


def link_token_key(token_hash: str) -> str:
    return f"link:{token_hash}"


def group_key(group_id: bytes) -> bytes:
    return b"group:" + bytes(group_id)
