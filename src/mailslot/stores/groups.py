"""What the group service needs from storage (GROUPS.md): states, change logs, and a replay cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class GroupChangeRecord:
    """One change as its actor signed it: enough for any member to verify it (Group-Auth input)."""

    revision: int
    actor: bytes
    timestamp_ms: int
    signature: bytes
    method: str
    path: str
    body: bytes


class GroupStore(Protocol):
    async def create(self, group_id: bytes, state: str, change: GroupChangeRecord, avatar: str = "") -> bool:
        """Store revision 0 and its change; False if the id exists. ``avatar``: the state's blob key."""
        ...

    async def get(self, group_id: bytes) -> tuple[int, str] | None:
        """(revision, state document) or None."""
        ...

    async def update(self, group_id: bytes, expected_revision: int, state: str, change: GroupChangeRecord,
                     avatar: str = "") -> bool:
        """Replace the state and append the change in one transaction, if the group is still at
        ``expected_revision``; False when another change got there first."""
        ...

    async def changes(self, group_id: bytes, from_revision: int, limit: int) -> list[GroupChangeRecord]: ...

    async def avatars_in_use(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` that some group's current state names as its avatar."""
        ...


class ReplayCache(Protocol):
    async def first_use(self, token: bytes, ttl_seconds: int) -> bool:
        """True the first time ``token`` is seen within ``ttl_seconds`` (on any node of a cluster)."""
        ...
