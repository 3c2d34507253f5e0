"""What blocking needs from storage: a sealed block key and the block tokens of each account."""

from __future__ import annotations

import uuid
from typing import Protocol


class BlockStore(Protocol):
    async def get_key(self, aci: uuid.UUID) -> bytes | None: ...

    async def put_key(self, aci: uuid.UUID, sealed_key: bytes) -> bytes: ...

    async def tokens(self, aci: uuid.UUID) -> set[bytes]: ...

    async def add(self, aci: uuid.UUID, token: bytes) -> None: ...

    async def remove(self, aci: uuid.UUID, token: bytes) -> None: ...
