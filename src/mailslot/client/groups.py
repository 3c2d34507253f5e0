"""Client side of Mailslot groups (GROUPS.md): keys, encrypted state, signed changes, Group-Auth.

This is the reference a client author implements; the server's tests use it. The server sees only
what this module sends: the group id, per-group member keys and roles, and blobs sealed under the
state key. Typical use::

    secrets = GroupSecrets.generate()                 # share secrets.master_key end to end
    me = MemberKey.generate()                         # my key for this group only
    mine = secrets.seal_member(MemberRecord(aci, profile_key, me.public, binding))
    document = new_group_state(secrets, me, mine, title="Book club")
    body, headers = signed(me, secrets.group_id, "PUT", group_path(secrets.group_id), document)
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailslot.crypto import xeddsa
from mailslot.crypto.groupauth import HEADER, make_header, signing_input

MASTER_KEY_BYTES = 32
BINDING_CONTEXT = b"mailslot-group-member-v1"
# Plaintext sizes after padding, per field: the server accepts exactly these (plus 28 bytes of seal).
PADDED_SIZES: dict[str, tuple[int, ...]] = {
    "title": (128,),
    "description": (512, 2048),
    "disappearingTimer": (16,),
    "encryptedMember": (256,),
    "encryptedInviteLinkPassword": (64,),
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _hkdf(master_key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(master_key)


def group_path(group_id: bytes, suffix: str = "") -> str:
    return "/v1/groups/" + base64.urlsafe_b64encode(group_id).decode().rstrip("=") + suffix


@dataclass(frozen=True)
class MemberRecord:
    """What ``encryptedMember`` holds: who the key belongs to, and the proof that it does."""

    aci: uuid.UUID
    profile_key: bytes  # 32 bytes
    member_key: bytes  # the member's public Ed25519 key in this group
    binding: bytes  # XEdDSA signature by the ACI identity key (64 bytes)

    def encode(self) -> bytes:
        return self.aci.bytes + self.profile_key + self.member_key + self.binding

    @classmethod
    def decode(cls, data: bytes) -> MemberRecord:
        if len(data) != 144:
            raise ValueError("not a member record")
        return cls(uuid.UUID(bytes=data[:16]), data[16:48], data[48:80], data[80:144])


def binding_signature(identity_private_key: bytes, group_id: bytes, member_public_key: bytes) -> bytes:
    """The member's ACI identity key vouches for its group key (clients verify; the server cannot)."""
    return xeddsa.sign(identity_private_key, BINDING_CONTEXT + group_id + member_public_key)


def verify_binding(identity_public_key: bytes, group_id: bytes, record: MemberRecord) -> bool:
    return xeddsa.verify(identity_public_key, BINDING_CONTEXT + group_id + record.member_key, record.binding)


class GroupSecrets:
    """The master key and what derives from it: the public group id and the state key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ValueError("a group master key is 32 bytes")
        self.master_key = master_key
        self.group_id = _hkdf(master_key, b"mailslot-group-id-v1")
        self.state_key = _hkdf(master_key, b"mailslot-group-state-v1")

    @classmethod
    def generate(cls) -> GroupSecrets:
        return cls(os.urandom(MASTER_KEY_BYTES))

    def seal(self, field: str, plaintext: bytes) -> bytes:
        """Pad to the smallest allowed size for ``field`` and seal (AES-256-GCM, random nonce)."""
        framed = struct.pack(">H", len(plaintext)) + plaintext
        size = next((s for s in PADDED_SIZES[field] if s >= len(framed)), None)
        if size is None:
            raise ValueError(f"{field} is too long")
        nonce = os.urandom(12)
        return nonce + AESGCM(self.state_key).encrypt(nonce, framed.ljust(size, b"\x00"), field.encode())

    def open(self, field: str, sealed: bytes) -> bytes:
        framed = AESGCM(self.state_key).decrypt(sealed[:12], sealed[12:], field.encode())
        (length,) = struct.unpack_from(">H", framed)
        return framed[2:2 + length]

    def seal_member(self, record: MemberRecord) -> bytes:
        return self.seal("encryptedMember", record.encode())

    def open_member(self, sealed: bytes) -> MemberRecord:
        return MemberRecord.decode(self.open("encryptedMember", sealed))


class MemberKey:
    """A per-group Ed25519 key: a member key, an invite key, or a joiner's key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public = private_key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> MemberKey:
        return cls(Ed25519PrivateKey.generate())

    @property
    def public_b64(self) -> str:
        return _b64(self.public)


# -- requests ---------------------------------------------------------------------------------------

def signed(key: MemberKey, group_id: bytes, method: str, path: str, document: Any | None = None,
           timestamp_ms: int | None = None) -> tuple[bytes, dict[str, str]]:
    """The body bytes and headers of a group request signed by ``key`` (no account credentials)."""
    body = b"" if document is None else json.dumps(document, separators=(",", ":")).encode()
    when = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    headers = {HEADER: make_header(key.private_key, group_id, method, path, when, body)}
    if body:
        headers["Content-Type"] = "application/json"
    return body, headers


def verify_change(group_id: bytes, change: dict[str, Any]) -> bool:
    """Check a log entry's signature (``GET .../logs``): the actor really signed that change."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    message = signing_input(group_id, change["method"], change["path"], int(change["timestamp"]),
                            base64.b64decode(change["body"]))
    try:
        Ed25519PublicKey.from_public_bytes(base64.b64decode(change["actor"])).verify(
            base64.b64decode(change["signature"]), message)
    except (InvalidSignature, ValueError):
        return False
    return True


# -- states and actions -----------------------------------------------------------------------------

def member_entry(key: bytes, role: str, encrypted_member: bytes) -> dict[str, Any]:
    return {"publicKey": _b64(key), "role": role, "encryptedMember": _b64(encrypted_member), "joinedAtRevision": 0}


def new_group_state(secrets: GroupSecrets, creator: MemberKey, creator_member: bytes, title: str = "",
                    description: str = "", members: list[dict[str, Any]] | None = None,
                    access: dict[str, str] | None = None) -> dict[str, Any]:
    """Revision 0, with the creator as administrator (plus any other ``members`` entries)."""
    return {
        "revision": 0,
        "title": _b64(secrets.seal("title", title.encode())) if title else None,
        "description": _b64(secrets.seal("description", description.encode())) if description else None,
        "accessControl": access or {"attributes": "MEMBER", "members": "MEMBER", "addFromInviteLink": "UNSATISFIABLE"},
        "announcementsOnly": False,
        "members": [member_entry(creator.public, "ADMIN", creator_member), *(members or [])],
        "pendingMembers": [],
        "requestingMembers": [],
    }


def change(revision: int, *actions: dict[str, Any]) -> dict[str, Any]:
    return {"revision": revision, "actions": list(actions)}


def invite(invite_key: MemberKey, encrypted_member: bytes, role: str = "MEMBER") -> dict[str, Any]:
    """Add a pending member: the invite key's private half goes to the invitee end to end."""
    return {"type": "addPendingMember", "publicKey": invite_key.public_b64, "role": role,
            "encryptedMember": _b64(encrypted_member)}


def accept_invite(own_key: MemberKey, encrypted_member: bytes) -> dict[str, Any]:
    """Signed with the invite key: replaces the invitation by the invitee's own member key."""
    return {"type": "acceptInvite", "publicKey": own_key.public_b64, "encryptedMember": _b64(encrypted_member)}


def decline_invite() -> dict[str, Any]:
    return {"type": "declineInvite"}


def remove_member(key: bytes) -> dict[str, Any]:
    return {"type": "removeMember", "publicKey": _b64(key)}


def modify_role(key: bytes, role: str) -> dict[str, Any]:
    return {"type": "modifyMemberRole", "publicKey": _b64(key), "role": role}


def remove_pending(key: bytes) -> dict[str, Any]:
    return {"type": "removePendingMember", "publicKey": _b64(key)}


def approve_request(key: bytes, role: str = "MEMBER") -> dict[str, Any]:
    return {"type": "approveRequestingMember", "publicKey": _b64(key), "role": role}


def deny_request(key: bytes) -> dict[str, Any]:
    return {"type": "denyRequestingMember", "publicKey": _b64(key)}


def set_title(secrets: GroupSecrets, title: str) -> dict[str, Any]:
    return {"type": "modifyTitle", "title": _b64(secrets.seal("title", title.encode()))}


def set_description(secrets: GroupSecrets, text: str) -> dict[str, Any]:
    return {"type": "modifyDescription", "description": _b64(secrets.seal("description", text.encode()))}


def set_timer(secrets: GroupSecrets, seconds: int) -> dict[str, Any]:
    return {"type": "modifyDisappearingTimer",
            "disappearingTimer": _b64(secrets.seal("disappearingTimer", struct.pack(">I", seconds)))}


def set_avatar(blob_key: str) -> dict[str, Any]:
    return {"type": "modifyAvatar", "avatar": blob_key}


def set_access(which: str, access: str) -> dict[str, Any]:
    """``which``: attributes, members or addFromInviteLink."""
    kind = {"attributes": "modifyAttributesAccess", "members": "modifyMembersAccess",
            "addFromInviteLink": "modifyAddFromInviteLinkAccess"}[which]
    return {"type": kind, "access": access}


def set_announcements_only(value: bool) -> dict[str, Any]:
    return {"type": "modifyAnnouncementsOnly", "announcementsOnly": value}


def set_invite_link(secrets: GroupSecrets, password: bytes | None) -> dict[str, Any]:
    """Set (random ≥ 16 bytes) or clear the link password; members read it back from the sealed copy."""
    if password is None:
        return {"type": "modifyInviteLinkPassword", "password": None}
    return {"type": "modifyInviteLinkPassword", "password": _b64(password),
            "encryptedPassword": _b64(secrets.seal("encryptedInviteLinkPassword", password))}


def join_request(password: bytes, encrypted_member: bytes) -> dict[str, Any]:
    """The body of ``POST .../join``, signed by the joiner's new member key."""
    return {"password": _b64(password), "encryptedMember": _b64(encrypted_member)}
