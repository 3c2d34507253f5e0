"""The group state the server keeps (GROUPS.md): opaque encrypted attributes, access control and
per-group member keys with roles. Pure data and its checks; no I/O.

Attribute and member blobs are encrypted by clients under the group's state key and padded to fixed
sizes, so their lengths say nothing; the server checks the lengths (``CIPHERTEXT_SIZES``) and never
reads the contents.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

from mailslot.services.errors import ServiceError

ROLES = ("ADMIN", "MEMBER")
MEMBER_ACCESS = ("ADMIN", "MEMBER")
LINK_ACCESS = ("UNSATISFIABLE", "ANY", "ADMINISTRATOR")

# AES-256-GCM (12-byte nonce, 16-byte tag) over plaintexts padded to these sizes.
SEAL_OVERHEAD = 28
PADDED_SIZES: dict[str, tuple[int, ...]] = {
    "title": (128,),
    "description": (512, 2048),
    "disappearingTimer": (16,),
    "encryptedMember": (256,),
    "encryptedInviteLinkPassword": (64,),
}
CIPHERTEXT_SIZES = {name: tuple(size + SEAL_OVERHEAD for size in sizes) for name, sizes in PADDED_SIZES.items()}
AVATAR_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
KEY_BYTES = 32


def invalid(message: str) -> ServiceError:
    return ServiceError(400, "invalid_group", message)


def b64decode(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise invalid(f"{name}: expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"{name}: invalid base64") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def blob(value: Any, name: str, optional: bool = True) -> bytes | None:
    """A client-encrypted attribute: absent/null, or base64 of one of the allowed sealed sizes."""
    if value is None and optional:
        return None
    data = b64decode(value, name)
    if len(data) not in CIPHERTEXT_SIZES[name]:
        sizes = ", ".join(str(s) for s in CIPHERTEXT_SIZES[name])
        raise invalid(f"{name}: must be {sizes} bytes (padded and sealed)")
    return data


def member_key(value: Any, name: str = "publicKey") -> bytes:
    data = b64decode(value, name)
    if len(data) != KEY_BYTES:
        raise invalid(f"{name}: must be a 32-byte Ed25519 public key")
    return data


def choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise invalid(f"{name}: must be one of {', '.join(allowed)}")
    return str(value)


def avatar(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not AVATAR_KEY.match(value):
        raise invalid("avatar: must be a blob key of letters, digits, '-' or '_'")
    return value


@dataclass(slots=True)
class Member:
    public_key: bytes
    role: str
    encrypted_member: bytes
    joined_at_revision: int


@dataclass(slots=True)
class PendingMember:
    public_key: bytes  # the invite key made by the inviter
    role: str
    encrypted_member: bytes
    added_by: bytes
    added_at_revision: int


@dataclass(slots=True)
class RequestingMember:
    public_key: bytes
    encrypted_member: bytes
    requested_at_revision: int


@dataclass(slots=True)
class AccessControl:
    attributes: str = "MEMBER"
    members: str = "MEMBER"
    add_from_invite_link: str = "UNSATISFIABLE"


@dataclass(slots=True)
class GroupState:
    revision: int
    title: bytes | None = None
    avatar: str = ""
    description: bytes | None = None
    disappearing_timer: bytes | None = None
    access: AccessControl = field(default_factory=AccessControl)
    announcements_only: bool = False
    members: dict[bytes, Member] = field(default_factory=dict)
    pending: dict[bytes, PendingMember] = field(default_factory=dict)
    requesting: dict[bytes, RequestingMember] = field(default_factory=dict)
    invite_link_password_hash: bytes | None = None
    encrypted_invite_link_password: bytes | None = None

    # -- questions the rules ask ----------------------------------------------------------------

    def role_of(self, key: bytes) -> str | None:
        member = self.members.get(key)
        return member.role if member else None

    def admins(self) -> int:
        return sum(1 for m in self.members.values() if m.role == "ADMIN")

    def holds(self, key: bytes) -> bool:
        return key in self.members or key in self.pending or key in self.requesting

    def size(self) -> int:
        """What the member limit counts: members and pending invitations."""
        return len(self.members) + len(self.pending)

    # -- the wire form --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "title": b64(self.title) if self.title else None,
            "avatar": self.avatar,
            "description": b64(self.description) if self.description else None,
            "disappearingTimer": b64(self.disappearing_timer) if self.disappearing_timer else None,
            "accessControl": {
                "attributes": self.access.attributes,
                "members": self.access.members,
                "addFromInviteLink": self.access.add_from_invite_link,
            },
            "announcementsOnly": self.announcements_only,
            "members": [
                {"publicKey": b64(m.public_key), "role": m.role, "encryptedMember": b64(m.encrypted_member),
                 "joinedAtRevision": m.joined_at_revision}
                for m in self.members.values()
            ],
            "pendingMembers": [
                {"publicKey": b64(p.public_key), "role": p.role, "encryptedMember": b64(p.encrypted_member),
                 "addedBy": b64(p.added_by), "addedAtRevision": p.added_at_revision}
                for p in self.pending.values()
            ],
            "requestingMembers": [
                {"publicKey": b64(r.public_key), "encryptedMember": b64(r.encrypted_member),
                 "requestedAtRevision": r.requested_at_revision}
                for r in self.requesting.values()
            ],
            "inviteLinkPasswordHash": b64(self.invite_link_password_hash) if self.invite_link_password_hash else None,
            "encryptedInviteLinkPassword": (
                b64(self.encrypted_invite_link_password) if self.encrypted_invite_link_password else None
            ),
        }

    @classmethod
    def from_json(cls, data: Any, trusted: bool = False) -> GroupState:
        """Parse a state document. ``trusted`` (our own storage) skips nothing but the creation rules."""
        if not isinstance(data, dict):
            raise invalid("the group state must be a JSON object")
        revision = data.get("revision")
        if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
            raise invalid("revision: must be a non-negative integer")
        access = data.get("accessControl") or {}
        if not isinstance(access, dict):
            raise invalid("accessControl: must be an object")
        state = cls(
            revision=revision,
            title=blob(data.get("title"), "title"),
            avatar=avatar(data.get("avatar")),
            description=blob(data.get("description"), "description"),
            disappearing_timer=blob(data.get("disappearingTimer"), "disappearingTimer"),
            access=AccessControl(
                choice(access.get("attributes", "MEMBER"), MEMBER_ACCESS, "accessControl.attributes"),
                choice(access.get("members", "MEMBER"), MEMBER_ACCESS, "accessControl.members"),
                choice(access.get("addFromInviteLink", "UNSATISFIABLE"), LINK_ACCESS,
                       "accessControl.addFromInviteLink"),
            ),
            announcements_only=bool(data.get("announcementsOnly", False)),
        )
        for entry in _entries(data, "members"):
            key = member_key(entry.get("publicKey"), "members.publicKey")
            state._claim(key)
            state.members[key] = Member(
                key, choice(entry.get("role"), ROLES, "members.role"),
                blob(entry.get("encryptedMember"), "encryptedMember", optional=False) or b"",
                _revision(entry.get("joinedAtRevision", 0), revision, "members.joinedAtRevision"),
            )
        for entry in _entries(data, "pendingMembers"):
            key = member_key(entry.get("publicKey"), "pendingMembers.publicKey")
            state._claim(key)
            state.pending[key] = PendingMember(
                key, choice(entry.get("role"), ROLES, "pendingMembers.role"),
                blob(entry.get("encryptedMember"), "encryptedMember", optional=False) or b"",
                member_key(entry.get("addedBy"), "pendingMembers.addedBy"),
                _revision(entry.get("addedAtRevision", 0), revision, "pendingMembers.addedAtRevision"),
            )
        for entry in _entries(data, "requestingMembers"):
            key = member_key(entry.get("publicKey"), "requestingMembers.publicKey")
            state._claim(key)
            state.requesting[key] = RequestingMember(
                key, blob(entry.get("encryptedMember"), "encryptedMember", optional=False) or b"",
                _revision(entry.get("requestedAtRevision", 0), revision, "requestingMembers.requestedAtRevision"),
            )
        if trusted:
            password_hash = data.get("inviteLinkPasswordHash")
            state.invite_link_password_hash = b64decode(password_hash, "hash") if password_hash else None
            state.encrypted_invite_link_password = blob(
                data.get("encryptedInviteLinkPassword"), "encryptedInviteLinkPassword"
            )
        return state

    def _claim(self, key: bytes) -> None:
        if self.holds(key):
            raise invalid("a key may appear only once among members, pending and requesting members")


def _entries(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    entries = data.get(name) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise invalid(f"{name}: must be a list of objects")
    return entries


def _revision(value: Any, current: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= current:
        raise invalid(f"{name}: must be a revision between 0 and the group's")
    return value
